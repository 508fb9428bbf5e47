"""A misspelt flag or YAML key stops ``train`` (and ``cache``) with the closest known option, never trains without
it: argparse's exit status 2 and the message on stderr."""

from __future__ import annotations

import pytest

from trl_diffusion_sdpo.cli.parsing import known_options
from trl_diffusion_sdpo.cli.train import make_parser, parse_args


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
    assert {"safeguard_mu", "learning_rate", "no_random_flip", "config", "dataset_name"} <= set(known)
    assert "attn_implementation" not in known and "load_in_4bit" in known  # quantizes the frozen base


def test_known_flags_still_parse(tmp_path):
    _, training_args, _, _ = parse_args(["--output_dir", str(tmp_path), "--safeguard_mu", "0.5"])
    assert training_args.safeguard_mu == 0.5


@pytest.mark.parametrize("command", ["train", "online"])
def test_a_prefix_of_a_flag_is_refused_not_taken_for_it(capsys, tmp_path, command):
    """argparse's abbreviations are off: ``--learning_rat`` is refused with the flag it resembles, never trained as
    ``--learning_rate``."""
    from trl_diffusion_sdpo.cli import online

    parse = parse_args if command == "train" else online.parse_args
    with pytest.raises(SystemExit) as info:
        parse(["--output_dir", str(tmp_path), "--learning_rat", "1e-4", "--prompts", "p.txt"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown option --learning_rat (did you mean --learning_rate?)" in err


def test_a_flag_error_prints_a_short_usage_and_the_error(capsys):
    err = refusal(capsys, ["--safegaurd_mu", "0.5"])
    lines = err.strip().splitlines()
    assert len(lines) == 2, err  # the usage line and the error, not a dump of every option
    assert lines[0].startswith("usage: trl-diffusion-sdpo train [--config FILE.yaml] [--OPTION VALUE ...]")
    assert lines[1].startswith("trl-diffusion-sdpo train: error: unknown option --safegaurd_mu")


def every_parser():
    """Each parser a command builds: the top-level one and its subcommands, train, online, cache, export, the demo."""
    import argparse

    from trl_diffusion_sdpo.cli import main as cli
    from trl_diffusion_sdpo.cli.cache import make_cache_parser
    from trl_diffusion_sdpo.cli.demo import build_parser as demo_parser
    from trl_diffusion_sdpo.cli.export import build_export_parser

    top = cli.build_parser((["pickscore"], ["partiprompts"]))
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    yield "trl-diffusion-sdpo", top
    yield from subcommands.choices.items()
    yield "train", make_parser()
    yield "online", parser_of_online()
    yield "cache", make_cache_parser()
    yield "export", build_export_parser()
    yield "demo", demo_parser()


def parser_of_online():
    from trl_diffusion_sdpo.cli import online

    return make_parser(
        "trl-diffusion-sdpo online", online.ARGUMENT_TYPES, online.DESCRIPTION, online.EPILOG, online.online_topics
    )


def test_no_parser_takes_a_prefix_for_an_option():
    """For every parser, its longest option name less its last letter is left unparsed, never read as the option."""
    checked = 0
    for name, parser in every_parser():
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and a.nargs != 0]
        if not options:
            continue
        option = max(options, key=len)
        action = next(a for a in parser._actions if option in a.option_strings)
        required = [w for a in parser._actions if a.required and a.option_strings for w in (a.option_strings[0], "x")]
        namespace, rest = parser.parse_known_args([option[:-1], "7", *required])
        assert getattr(namespace, action.dest, None) != "7", (name, option)
        assert option[:-1] in rest, (name, option)
        checked += 1
    assert checked >= 8  # evaluate, pairs, train, online, cache, export, the demo twice
