"""``estimate-memory``'s stored option table is the real parser's (regenerated and compared), and the stored parser
reads a YAML file and flags into the values the real parser reads, or leaves them to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import stored_options
from trl_diffusion_sdpo.cli.option_table import OPTION_FILE, parse_stored

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"


def test_stored_option_table_is_the_real_parsers():
    """The file equals the table made from ``estimate-memory``'s real parser now (``train``'s argument classes and
    the estimate's): an option added, removed or changed there fails here until the file is regenerated."""
    stored = json.loads(OPTION_FILE.read_text())
    fresh = json.loads(json.dumps(stored_options.generate()))
    assert [e["dest"] for e in stored["options"]] == [e["dest"] for e in fresh["options"]]
    assert stored == fresh, "python -m trl_diffusion_sdpo.cli.stored_options regenerates it"


def _real_namespace(argv: list[str]) -> dict:
    """What the real parser reads before its argument classes are made: the YAML file's values as defaults (its
    relative paths read from its folder), the flags over them."""
    import yaml

    from trl_diffusion_sdpo.cli.memory_parser import make_estimate_parser

    parser = make_estimate_parser("train")
    argv = list(argv)
    if "--config" in argv:
        at = argv.index("--config")
        parser.config_path = argv[at + 1]
        with open(argv[at + 1]) as f:
            assert parser.set_defaults_with_config(**yaml.safe_load(f)) == []
        del argv[at : at + 2]
    namespace, unknown = parser.parse_known_args(argv)
    assert unknown == []
    return vars(namespace)


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", str(CONFIGS / "flux_lora.yaml"), "--gpu", "24"],
        [
            "--config",
            str(CONFIGS / "sdxl_full.yaml"),
            "--optim",
            "adamw_torch_8bit",
            "--per_device_train_batch_size=2",
        ],
        ["--config", str(CONFIGS / "sd15_lora.yaml"), "--bf16", "--no_random_flip", "--engine", "zero2"],
        [
            "--model_name_or_path",
            "Qwen/Qwen-Image",
            "--use_peft",
            "yes",
            "--learning_rate",
            "3e-5",
            "--resolution",
            "768",
        ],
    ],
)
def test_stored_parser_reads_what_the_real_parser_reads(argv):
    """Every option's value, the YAML file's (typed by the option where YAML gave text, as argparse does) and the
    flags' (bools, choices, numbers, a --no_ switch), as the real parser's namespace holds it."""
    parsed = parse_stored(["--use_cpu", "true", *argv])
    assert parsed is not None
    stored = {name: value for group in parsed for name, value in vars(group).items()}
    real = {
        name: getattr(value, "value", value) for name, value in _real_namespace(["--use_cpu", "true", *argv]).items()
    }
    assert set(real) == set(stored)  # every option of the real parser, none more
    # the rewrites of DiffusionSDPOConfig's __post_init__ that the stored parse makes too
    assert stored.pop("safeguard_space") in ("output", "none", "parameter", "update")
    real.pop("safeguard_space")
    if isinstance(real.get("safeguard_mu"), str) and real["safeguard_mu"] != "auto":
        real["safeguard_mu"] = float(real["safeguard_mu"])
    assert stored == real


@pytest.mark.parametrize(
    "argv",
    [
        ["--model_name_or_path", "Qwen/Qwen-Image", "--learning_rat", "1e-5"],  # a typo
        ["--model_name_or_path", "Qwen/Qwen-Image", "--resolution", "big"],  # a value its type refuses
        ["--model_name_or_path", "Qwen/Qwen-Image", "--safeguard_space", "nowhere"],  # a choice refused
        ["--model_name_or_path", "Qwen/Qwen-Image", "--beta", "-1"],  # a config rule refuses it
        ["--model_name_or_path", "Qwen/Qwen-Image", "--help"],
        ["--model_name_or_path", "Qwen/Qwen-Image", "--lora_target_modules", "to_q"],  # TRL rewrites a one-item list
        ["--model_name_or_path", "Qwen/Qwen-Image", "--gradient_checkpointing", "true"],  # transformers' alias
        ["--model_name_or_path", "Qwen/Qwen-Image", "--debug", "underflow_overflow"],  # a transformers type
        ["--model_name_or_path", "Qwen/Qwen-Image", "--debug=underflow_overflow"],  # the same, spelt with =
    ],
)
def test_stored_parser_leaves_to_the_real_parser_what_it_does_not_decide(argv):
    assert parse_stored(["--use_cpu", "true", *argv]) is None


def test_stored_config_answers_what_the_config_class_answers(tmp_path):
    """The properties the config's rules read beside its fields, on the stored parser's values, as the class's own
    property getters compute them from the same values."""
    import itertools

    from trl_diffusion_sdpo.cli.option_table import StoredArguments
    from trl_diffusion_sdpo.config.fields import DiffusionSDPOConfig

    for space, noising, loss in itertools.product(
        ("none", "output", "parameter", "update"), (None, "forward", "inversion"), ("dpo", "smpo", "sft")
    ):
        values = StoredArguments(safeguard_space=space, noising=noising, loss_type=loss)
        for name in ("safeguarded", "inverts"):
            assert getattr(values, name) == getattr(DiffusionSDPOConfig, name).fget(values), (name, space, noising)
    # an unset field resolves from DiffusionSDPOConfig's own table, which the stored values stand in for
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    for name in ("safeguard_space", "safeguard_mu", "beta", "learning_rate"):
        assert StoredArguments(loss_type="dpo").default_for(name) == config.default_for(name), name
