"""What a user of TRL's DPOTrainer types works here, or is refused or warned in one line naming the diffusion value:
loss_type's TRL name and list form, beta on TRL's scale, DPOConfig fields and DPOTrainer arguments with no
counterpart, and the command line's answer to them."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.helpers.cli_runs import pair_folders
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.cli import refusals
from trl_diffusion_sdpo.cli.command_parser import unknown_names_message
from trl_diffusion_sdpo.config.defaults import resolved_config
from trl_diffusion_sdpo.config.extras import TRACKER_EXTRAS
from trl_diffusion_sdpo.config.trl_habits import MARGIN_BOUND
from trl_diffusion_sdpo.config.trl_refusals import TRL_CONFIG_NAMES, TRL_TRAINER_ARGUMENTS
from trl_diffusion_sdpo.families import FluxFamily
from trl_diffusion_sdpo.families.sd import StableDiffusionFamily
from trl_diffusion_sdpo.io.run_summary import start_summary, start_warnings
from trl_diffusion_sdpo.objectives import DiffusionDPOObjective, objective_from_config

TINY = "trl-diffusion-sdpo:tiny"


def _config(tmp_path, **fields) -> DiffusionSDPOConfig:
    return DiffusionSDPOConfig(**{"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": "none", **fields})


@pytest.mark.parametrize("given", ["sigmoid", ["sigmoid"], ["dpo"], ("sigmoid",)])
def test_trls_sigmoid_and_its_list_form_train_diffusion_dpo(tmp_path, given):
    config = _config(tmp_path, loss_type=given, beta=2000.0)
    assert config.loss_type == "dpo"
    objective = objective_from_config(config, num_train_timesteps=1000)
    assert type(objective) is DiffusionDPOObjective and objective.beta == 2000.0


def test_a_list_of_several_losses_is_refused_in_one_line_naming_the_one_objective_and_sft_weight(tmp_path):
    with pytest.raises(ValueError) as refused:
        _config(tmp_path, loss_type=["sigmoid", "sft"])
    message = str(refused.value)
    assert "\n" not in message and "one objective trains per run" in message and "sft_weight" in message


def test_the_command_line_reads_sigmoid_and_the_yaml_list_form(tmp_path):
    from trl_diffusion_sdpo.cli.train_options import parse_args

    pairs = pair_folders(tmp_path / "pairs")
    words = ["--model_name_or_path", TINY, "--dataset_name", str(pairs), "--output_dir", str(tmp_path / "o")]
    listed = tmp_path / "trl.yaml"
    listed.write_text("loss_type: [sigmoid]\n")
    for flags in (["--loss_type", "sigmoid"], ["--config", str(listed)]):
        refusals.refuse_train([*words, *flags])  # the early checks let it through
        parsed = parse_args([*words, *flags])
        config = next(args for args in parsed if isinstance(args, DiffusionSDPOConfig))
        assert config.loss_type == "dpo"


@pytest.mark.parametrize("name", sorted(TRL_CONFIG_NAMES))
def test_a_dpo_config_field_with_no_counterpart_is_refused_saying_what_takes_its_place(tmp_path, name):
    with pytest.raises(TypeError) as refused:
        _config(tmp_path, **{name: 1})
    assert str(refused.value) == f"DiffusionSDPOConfig: {name} is TRL's setting for language models, not used " + (
        f"here: {TRL_CONFIG_NAMES[name]}."
    )


def test_any_other_unknown_keyword_is_refused_as_python_refuses_it(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lenght'"):
        _config(tmp_path, max_lenght=1)
    # a copy, a replace and a pickle go through the class's __new__ without keywords
    config = _config(tmp_path, beta=100.0)
    assert dataclasses.replace(config, beta=200.0).beta == 200.0


def test_max_length_is_not_answered_with_max_sequence_length():
    """On the command line and in a YAML file, TRL's max_length says what limits prompts and images here, not the
    closest name (max_sequence_length, the flow text encoders' prompt tokens, another setting)."""
    known = ["max_sequence_length", "resolution", "learning_rate"]
    flag = unknown_names_message(known, [], ["--max_length", "512"])
    key = unknown_names_message(known, ["--max_length", "512"], [])
    for message in (flag, key):
        assert "did you mean" not in message and "resolution" in message and "77 tokens" in message
    assert flag.startswith("--max_length is TRL's setting for language models")
    assert key.startswith("the --config file's key max_length is TRL's setting")
    # any other misspelt flag keeps the closest name
    assert unknown_names_message(known, [], ["--max_sequence_lenght", "5"]).endswith(
        "(did you mean --max_sequence_length?)"
    )


def test_the_train_command_refuses_max_length_before_loading_anything(tmp_path, capsys):
    pairs = pair_folders(tmp_path / "pairs")
    words = ["--model_name_or_path", TINY, "--dataset_name", str(pairs), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as ended:
        refusals.refuse_train([*words, "--max_length", "512"])
    assert ended.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_length is TRL's setting" in last and "did you mean" not in last


@pytest.mark.parametrize("name", sorted(TRL_TRAINER_ARGUMENTS))
def test_a_dpo_trainer_argument_with_no_counterpart_is_refused_before_anything_loads(name):
    with pytest.raises(TypeError) as refused:
        DiffusionSDPOTrainer("no-such-pipeline", **{name: object()})
    assert TRL_TRAINER_ARGUMENTS[name] in str(refused.value) and name in str(refused.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'data_colator'"):
        DiffusionSDPOTrainer("no-such-pipeline", data_colator=object())


def _warnings(tmp_path, family, **fields) -> list[str]:
    given = _config(tmp_path, **{"max_steps": 10, "warmup_steps": 0, "learning_rate": 1e-5, **fields})
    effective, _ = resolved_config(given, family)
    return start_warnings(given, effective, family, True, 10)


def test_trls_beta_warns_at_the_start_naming_the_familys_beta(tmp_path):
    sd = _warnings(tmp_path, StableDiffusionFamily, beta=0.1)
    assert len(sd) == 1 and "beta=0.1 keeps the loss at ln 2" in sd[0]
    sd_beta = f"stable-diffusion's is {StableDiffusionFamily.default_beta:g} ({StableDiffusionFamily.beta_source})"
    assert sd_beta in sd[0]
    flux = _warnings(tmp_path, FluxFamily, beta=0.1, learning_rate=FluxFamily.default_learning_rate)
    assert len(flux) == 1 and f"flux's is {FluxFamily.default_beta:g}" in flux[0]
    # the family's own beta, and a beta that does not scale the Diffusion-DPO logit (DSPO's sd15 form), do not warn
    assert _warnings(tmp_path, StableDiffusionFamily, beta=None) == []
    assert _warnings(tmp_path, StableDiffusionFamily, beta=1.0) == []
    assert _warnings(tmp_path, StableDiffusionFamily, loss_type="dspo", beta=0.001) == []


def test_the_beta_rule_bounds_the_logit_and_sgds_step_scales_with_beta():
    """The rule's two claims, computed from the objective: at the largest margin a model that predicts better than
    zero reaches (MARGIN_BOUND) beta=0.1 keeps the loss between 0.644 and 0.744; at the start (u = 0) the loss's
    gradient is beta / 4 times the margin's, so an SGD step at 0.1 is 0.1 / 5000 of the step at the family's beta."""

    def loss_and_gradient(beta: float, margin: float) -> tuple[float, float]:
        m = torch.tensor(margin, dtype=torch.float64, requires_grad=True)
        loss = -torch.nn.functional.logsigmoid(-0.5 * beta * m)
        loss.backward()
        return loss.item(), m.grad.item()

    for margin in (-MARGIN_BOUND, MARGIN_BOUND):
        assert abs(loss_and_gradient(0.1, margin)[0] - torch.log(torch.tensor(2.0)).item()) < 0.052
    small, family = loss_and_gradient(0.1, 0.0)[1], loss_and_gradient(5000.0, 0.0)[1]
    assert small == pytest.approx(0.1 / 4) and small / family == pytest.approx(0.1 / 5000)


def test_the_start_summary_names_the_compile_backend(tmp_path):
    given = _config(tmp_path, max_steps=1, learning_rate=1e-5, torch_compile=True, torch_compile_backend="aot_eager")
    effective, _ = resolved_config(given, StableDiffusionFamily)
    text = start_summary(given, effective, "stable-diffusion", True, "PlainEngine()", 1)
    assert "compiled (torch_compile_backend aot_eager, torch_compile_mode default)" in text
    inductor = _config(tmp_path, max_steps=1, learning_rate=1e-5, torch_compile=True)
    assert "torch_compile_backend inductor" in start_summary(
        inductor, resolved_config(inductor, StableDiffusionFamily)[0], "stable-diffusion", True, "PlainEngine()", 1
    )
    eager = resolved_config(_config(tmp_path, learning_rate=1e-5), StableDiffusionFamily)[0]
    assert "compiled" not in start_summary(eager, eager, "stable-diffusion", True, "PlainEngine()", 1)


def test_report_to_tensorboard_without_it_names_the_extra_and_the_readme_installs_it(tmp_path, monkeypatch):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[2]
    extra, modules = TRACKER_EXTRAS["tensorboard"]
    # the extra installs the library, and the README's install line names the extra for report_to="tensorboard"
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith(modules[0]) for requirement in extras[extra])
    install = (root / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert f'pip install -e ".[{extra}]"' in install and 'report_to="tensorboard"' in install
    _config(tmp_path, report_to="tensorboard")  # installed here: accepted
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else find_spec(name, *a))
    with pytest.raises(ValueError) as refused:
        _config(tmp_path, report_to=["tensorboard"])
    assert str(refused.value) == (
        "report_to='tensorboard': tensorboard is not installed. Install the package's 'eval' extra: "
        'pip install "trl-diffusion-sdpo[eval]" (from a clone: pip install -e ".[eval]").'
    )


def _distance_moved(make_trainer, beta: float, optim: str, steps: int) -> float:
    """How far ``steps`` optimizer steps at ``beta`` move the trainable weights (L2 over every one), unclipped and
    without weight decay (which would move them whatever the gradient)."""
    trainer = make_trainer(
        beta=beta, optim=optim, max_steps=steps, max_grad_norm=0.0, weight_decay=0.0, learning_rate=1e-4
    )
    trained = [(p, p.detach().clone()) for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    return sum(((p.detach() - before) ** 2).sum() for p, before in trained).sqrt().item()


def test_under_adamw_trls_beta_moves_the_weights_about_as_far_as_the_familys(make_trainer):
    """What the warning says of AdamW, on the tiny pipeline: it normalises the gradient's scale, so two steps at beta
    0.1 move the weights about as far as at the family's 5000 (the loss meanwhile stays at ln 2)."""
    small, family = (_distance_moved(make_trainer, beta, "adamw_torch", 2) for beta in (0.1, 5000.0))
    assert small == pytest.approx(family, rel=0.25)


@pytest.mark.slow  # test_the_beta_rule_bounds_the_logit_and_sgds_step_scales_with_beta covers the gradient's scale
def test_under_sgd_trls_beta_moves_the_weights_beta_over_the_familys_as_far(make_trainer):
    small, family = (_distance_moved(make_trainer, beta, "sgd", 1) for beta in (0.1, 5000.0))
    assert small / family == pytest.approx(0.1 / 5000.0, rel=1e-3)
