"""A misspelt flag or YAML key stops ``train`` (and ``cache``) with the closest known option, never trains without
it: argparse's exit status 2 and the message on stderr."""

from __future__ import annotations

import pytest

from trl_diffusion_sdpo.scripts.train import known_options, make_parser, parse_args


def refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_a_misspelt_flag_names_the_known_one(capsys):
    err = refusal(capsys, ["--model_name_or_path", "m", "--safegaurd_mu", "0.5", "--output_dir", "out"])
    assert "unknown option --safegaurd_mu (did you mean --safeguard_mu?)" in err
    assert "'0.5'" not in err  # taken as the unknown flag's value, not reported again


def test_a_misspelt_flag_with_equals_and_a_stray_word_are_both_named(capsys):
    err = refusal(capsys, ["--lerning_rate=1e-4", "stray"])
    assert "unknown option --lerning_rate (did you mean --learning_rate?)" in err
    assert "unexpected argument 'stray'" in err


def test_a_misspelt_yaml_key_names_the_known_one(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\nwarmup_step: 0\noutput_dir: out\n")
    err = refusal(capsys, ["--config", str(config)])
    assert "unknown key 'warmup_step' in the --config file (did you mean warmup_steps?)" in err


def test_a_name_like_no_known_option_gets_no_guess(capsys):
    err = refusal(capsys, ["--zzzzqqqq", "1"])
    assert "unknown option --zzzzqqqq" in err and "did you mean" not in err


def test_known_options_are_the_listed_flags_without_the_hidden_ones():
    known = known_options(make_parser())
    assert {"safeguard_mu", "learning_rate", "no_scale_lr", "config", "dataset_name"} <= set(known)
    assert "attn_implementation" not in known and "load_in_4bit" in known  # quantizes the frozen base


def test_known_flags_still_parse(tmp_path):
    _, training_args, _, _ = parse_args(["--output_dir", str(tmp_path), "--safeguard_mu", "0.5"])
    assert training_args.safeguard_mu == 0.5
