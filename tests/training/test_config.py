"""Config validation fails when the config is made, the chosen objective's fields included, with a message that says
what to change; no field's value depends on the machine; learning-rate scaling."""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import re

import pytest
import transformers

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.config import docs, rules
from trl_diffusion_sdpo.config.checks import Choice
from trl_diffusion_sdpo.config.defaults import (
    DATA_WORKERS,
    data_loading_defaults,
    resolve_default,
)
from trl_diffusion_sdpo.config.machine import MACHINE, machine_choices


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(DiffusionSDPOConfig) if f.name == name)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"safeguard_mu": 1.5}, r"safeguard_mu must lie in \[0, 1\]"),
        ({"safeguard_mu": -0.1}, r"safeguard_mu must lie in \[0, 1\]"),
        ({"safeguard_max_lambda": 0.0}, "safeguard_max_lambda must be positive"),
        ({"resolution": 30}, "multiple of 8"),
        ({"resolution": 0}, "multiple of 8"),
        ({"proportion_empty_prompts": 1.2}, r"proportion_empty_prompts must lie in \[0, 1\]"),
        ({"min_timestep": -1}, "min_timestep"),
        ({"min_timestep": 500, "max_timestep": 500}, "max_timestep"),
        ({"on_nonfinite_loss": "ignore"}, r"on_nonfinite_loss must be one of \['skip', 'raise'\]"),
        (
            {"safeguard_space": "gradient"},
            r"safeguard_space must be one of \['none', 'output', 'parameter', 'update'\]",
        ),
        ({"safeguard_scope": "world"}, r"safeguard_scope must be one of \['local', 'global', 'pair'\]"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        # Non-finite values, which used to make training skip every step and still "finish"
        ({"safeguard_mu": float("nan")}, "safeguard_mu must be finite"),
        ({"safeguard_max_lambda": float("nan")}, "safeguard_max_lambda must be finite"),
        ({"safeguard_max_lambda": float("inf")}, "safeguard_max_lambda must be finite"),
        ({"proportion_empty_prompts": float("nan")}, "proportion_empty_prompts must be finite"),
        # Values that failed only inside torch at train()
        ({"learning_rate": -1e-05}, "learning_rate must be >= 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be finite"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must lie in \[0, 1\)"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be finite"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1"),
        # The data fields
        ({"resolution": 64.5}, "resolution must be an integer"),
        ({"max_timestep": 0}, "max_timestep must be >= 1"),
        # The flow-matching families' fields
        ({"flow_weighting_scheme": "uniform"}, r"flow_weighting_scheme must be one of \['logit_normal', .*\] or None"),
        ({"flow_shift": "dynamic"}, r"flow_shift must be one of \['scheduler', 'resolution', 'none'\] or None"),
        ({"flow_logit_std": 0.0}, "flow_logit_std must be positive"),
        ({"flow_logit_std": float("nan")}, "flow_logit_std must be finite"),  # passed the old `<= 0` check
        ({"max_sequence_length": 0}, "max_sequence_length must be >= 1"),
        ({"max_sequence_length": 77.5}, "max_sequence_length must be an integer or None"),
        # Wrong types, as a YAML file gives them
        ({"safeguard_mu": True}, "safeguard_mu must be a real number"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    for value in overrides.values():
        if not isinstance(value, bool):
            assert str(value) in str(info.value)  # the offending value is quoted back


# (overrides, message): the objective's own fields, checked by the objective loss_type names (objectives/*.py)
OBJECTIVE_FIELD_CASES = [
    ({"beta": 0.0}, "beta must be positive"),
    ({"beta": -1}, "beta must be positive, got -1. Leave it unset for the model family's value."),
    ({"beta": -10.0}, "beta must be positive"),
    ({"beta": float("nan")}, "beta must be finite"),
    ({"beta": float("inf")}, "beta must be finite"),
    ({"beta": "5e3"}, r"beta must be a real number, got '5e3' \(str\)\. \(In YAML"),
    ({"loss_type": "ipo"}, "loss_type"),
    ({"loss_type": "dmpo", "dmpo_alpha": 1.0}, r"dmpo_alpha must lie in \(0, 1\)"),
    ({"loss_type": "dmpo", "dmpo_alpha": -1}, r"dmpo_alpha must lie in \(0, 1\), got -1. DMPO's target is q = 1"),
    ({"loss_type": "mapo", "mapo_snr_value": 0.0}, "mapo_snr_value must be positive"),
    ({"loss_type": "mapo", "mapo_beta": float("inf")}, "mapo_beta must be finite"),
    ({"loss_type": "smpo", "smpo_gamma": -1.0}, "smpo_gamma must be positive"),
    ({"loss_type": "smpo", "smpo_gamma": 0.0}, "smpo_gamma must be positive"),  # every weight 0: nothing taught
    (
        {"loss_type": "smpo", "smpo_score_min": 0.3, "smpo_score_max": 0.2},
        r"smpo_score_max \(0.2\) must be larger than smpo_score_min",
    ),
    ({"loss_type": "dspo", "dspo_form": "sd21"}, "dspo_form must be one of"),
]


@pytest.mark.parametrize(("overrides", "message"), OBJECTIVE_FIELD_CASES)
def test_the_chosen_objective_refuses_a_bad_value_of_its_own_fields_when_the_config_is_made(
    tmp_path, overrides, message
):
    """The config asks the objective loss_type names, which refuses the value naming the field, quoting the value
    and saying what to change."""
    with pytest.raises(ValueError, match=message) as info:
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    for value in overrides.values():
        if value not in ("dmpo", "mapo", "smpo", "dspo"):
            assert str(value) in str(info.value)  # the offending value is quoted back


@pytest.mark.parametrize("loss_type", ["dpo", "dspo", "mapo", "sft", "smpo"])
def test_dmpo_alpha_is_checked_only_when_dmpo_trains(tmp_path, loss_type):
    """Another objective never reads dmpo_alpha, so it never refuses it."""
    from trl_diffusion_sdpo.objectives import check_objective_config

    space = "none" if loss_type == "sft" else "output"
    config = DiffusionSDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, loss_type=loss_type, dmpo_alpha=5.0, safeguard_space=space
    )
    check_objective_config(config)
    config.loss_type = "dmpo"
    with pytest.raises(ValueError, match=r"dmpo_alpha must lie in \(0, 1\), got 5.0"):
        check_objective_config(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_timestep": 5000}, "max_timestep=5000 is beyond the scheduler's num_train_timesteps=1000"),
        ({"min_timestep": 1000}, "min_timestep=1000 leaves no timestep to train on"),
    ],
)
def test_timesteps_beyond_the_scheduler_are_refused_when_the_trainer_is_built(make_trainer, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(**overrides)


def test_defaults_follow_the_papers_but_beta_and_the_safeguard_margin(tmp_path):
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert config.safeguarded and config.safeguard_space == "output" and config.safeguard_max_lambda == 1.0
    # TRL's habit: learning_rate is the rate, unset the family's (the shipped LoRA configs' 1e-5 for SD); the
    # authors' scaling is opt-in
    assert config.learning_rate is None and not config.scale_lr
    assert resolve_default("learning_rate").value == 1e-5
    assert config.safeguard_scope == "global"  # the scope every engine runs (ZeRO-3 and FSDP2 refuse local)
    assert config.max_grad_norm == 1.0 and config.proportion_empty_prompts == 0.2 and config.random_flip
    assert not config.remove_unused_columns
    # beta and mu: unset, resolved per model family by the trainer (config.defaults; test_defaults); their helps
    # name the values the table resolves to
    assert config.beta is None and config.safeguard_mu is None
    help_text = " ".join(_field("safeguard_mu").metadata["help"].split())
    for authors in (
        "0.9 for SD1.5 (family stable-diffusion) with Diffusion-DPO and DMPO, 0.2 with DSPO",
        "0.6 for SDXL",
        "elsewhere, and on the shipped tiny base, 0.5",
    ):
        assert authors in help_text
    assert DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard_mu=0.9).safeguard_mu == 0.9


# DPOConfig adds 25 over TrainingArguments; 4 here are the held-out probe's (its alarm's noise draws, threshold and
# patience, and the seed that draws its held-back pairs), 3 the rewind's ladder (its rungs, its factor, and whether a
# run ending on its starting weights may exit 0)
DIFFUSION_SDPO_FIELD_LIMIT = 59


def test_the_config_adds_at_most_fifty_fields_over_training_arguments():
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    added = [f.name for f in dataclasses.fields(DiffusionSDPOConfig) if f.name not in inherited]
    assert len(added) <= DIFFUSION_SDPO_FIELD_LIMIT, (len(added), added)


@pytest.mark.parametrize("batch,accumulation", [(2, 1), (1, 3), (2, 2)])
def test_scale_lr_multiplies_by_world_batch_and_accumulation_without_mutating_the_config(
    make_trainer, batch, accumulation
):
    trainer = make_trainer(
        scale_lr=True, learning_rate=1e-5, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
    )
    expected = 1e-5 * trainer.args.world_size * batch * accumulation
    assert trainer.args.world_size == 1
    assert trainer.args.learning_rate == pytest.approx(expected)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_scale_lr_leaves_the_callers_config_object_alone(make_config, make_pipeline, pickapic_dataset):
    from tests.helpers.common import lora_config
    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    config = make_config(
        scale_lr=True, learning_rate=1e-5, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    for _ in range(2):  # reusing the config must not compound the scaling
        trainer = DiffusionSDPOTrainer(
            make_pipeline(), args=config, train_dataset=pickapic_dataset, peft_config=lora_config()
        )
        assert config.learning_rate == 1e-5
        assert trainer.args.learning_rate == pytest.approx(4e-5)
        assert trainer.args is not config


def test_scale_lr_false_uses_the_learning_rate_as_given(make_trainer):
    trainer = make_trainer(scale_lr=False, learning_rate=3e-4, gradient_accumulation_steps=4)
    assert trainer.args.learning_rate == 3e-4


def test_one_name_per_choice_the_older_alias_is_refused(tmp_path):
    # loss_type="sigmoid" is TRL's name of Diffusion-DPO's loss, read as "dpo" (tests/training/test_trl_habits.py)
    with pytest.raises(TypeError, match="safeguard"):
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, safeguard=False)


def test_the_space_none_trains_diffusion_dpo(make_trainer):
    from trl_diffusion_sdpo.safeguards import SAFEGUARDS

    trainer = make_trainer(safeguard_space="none")
    assert SAFEGUARDS["none"] is None and trainer.safeguard is None  # no safeguard object: the trainer's step alone
    assert trainer.card_method.name(trainer.args) == "Diffusion-DPO"


def test_a_choice_lists_its_options_in_the_order_given():
    choice = Choice(("sd15", "sdxl", "flow"))
    assert choice.check("form", "sdxl") == "sdxl"
    with pytest.raises(ValueError) as info:
        choice.check("form", "sd21")
    assert str(info.value) == "form must be one of ['sd15', 'sdxl', 'flow'], got 'sd21'."


# -- one source for each field's documentation ------------------------------------------------------------------------


def test_the_docstring_is_each_declared_fields_help_under_one_heading():
    """Every field the class declares (its own and the TrainingArguments defaults it changes) is documented once, in
    the docstring, by its help text, under one ``> Parameters ...`` heading, with its type and default."""
    doc = " ".join(DiffusionSDPOConfig.__doc__.split())
    declared = list(vars(DiffusionSDPOConfig)["__annotations__"])
    assert len(declared) > 40
    headings = re.findall(r"^> (.+)$", DiffusionSDPOConfig.__doc__, flags=re.MULTILINE)
    assert headings == list(docs.GROUPS) and "Parameters that control the safeguard" in headings
    for name in declared:
        field = _field(name)
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help_text = " ".join(field.metadata["help"].split())
        entries = [m.start() for m in re.finditer(rf"(?<!\w){name} \(`", doc)]
        assert len(entries) == 1, name  # one entry, found under exactly one heading
        start = entries[0]
        stated = re.match(rf"{name} \(`[^)]*`, \*optional\*, defaults to `([^`]*)`\): ", doc[start:])
        assert stated and ast.literal_eval(stated[1]) == getattr(default, "value", default), name
        assert doc[start + stated.end() :].startswith(help_text), name  # the entry's text is the help itself
    owner = {name: heading for heading, (_, names) in docs.GROUPS.items() for name in names}
    assert owner["safeguard_mu"] == "Parameters that control the safeguard"
    assert owner["learning_rate"] == "Defaults changed from `TrainingArguments`"


def test_each_config_classs_docstring_is_its_writers_text_when_read_on_the_class_an_instance_or_by_help():
    """Written when first read (a run never reads it): the class, an instance and ``inspect.getdoc`` see the text
    :func:`~trl_diffusion_sdpo.config.docs.config_docstring` writes for that class and its headings (the online
    config's own among them); a subclass's own docstring stays its own."""
    import inspect

    from trl_diffusion_sdpo.config import fields
    from trl_diffusion_sdpo.online import config as online

    written = docs.config_docstring(DiffusionSDPOConfig, fields._SUMMARY)
    assert DiffusionSDPOConfig.__doc__ == written and inspect.getdoc(DiffusionSDPOConfig) == inspect.cleandoc(written)
    assert DiffusionSDPOConfig.__new__(DiffusionSDPOConfig).__doc__ == written  # an instance reads the class's
    online_written = docs.config_docstring(online.OnlineDiffusionSDPOConfig, online._SUMMARY, online._GROUPS)
    assert online.OnlineDiffusionSDPOConfig.__doc__ == online_written
    assert "> Parameters that control the generation" in online_written

    @dataclasses.dataclass
    class Mine(DiffusionSDPOConfig):
        """My settings."""

    assert Mine.__doc__ == "My settings."


def test_a_field_no_heading_lists_fails_the_writing_of_its_classs_docstring():
    @dataclasses.dataclass
    class Extended(DiffusionSDPOConfig):
        new_weight: float = dataclasses.field(default=1.0, metadata={"help": "A weight."})

    with pytest.raises(TypeError, match=r"must list each field of Extended once: not listed \['new_weight'\]"):
        docs.config_docstring(Extended, "Summary.")
    written = docs.config_docstring(DiffusionSDPOConfig, "S.").splitlines()
    beta = next(line for line in written if line.startswith("beta ("))
    assert beta.endswith("*optional*, defaults to `None`):") and "`float`" in beta  # unset: the family's value


def test_no_help_says_the_parameter_space_runs_a_pass_per_branch_by_default():
    """The parameter space's default is one forward and backward pass with the branches' gradients split inside it
    (safeguard_passes='one'); two passes only with 'two' or where the engine cannot split."""
    space = " ".join(_field("safeguard_space").metadata["help"].split())
    assert "by default one forward and one backward pass with the branches' gradients split inside it" in space
    doc = " ".join(DiffusionSDPOConfig.__doc__.split())
    per_branch = [sentence for sentence in doc.split(". ") if re.search(r"pass(es)? per branch", sentence)]
    assert per_branch and all("`two`" in sentence for sentence in per_branch), per_branch
    assert _field("safeguard_passes").default == "one"


def test_the_objectives_and_options_the_help_names_are_the_registered_ones():
    """The config imports no objective, so ``--help``'s lists are the config's: they must match the owners'."""
    from trl_diffusion_sdpo.families import inversion
    from trl_diffusion_sdpo.objectives import DSPO_FORMS, OBJECTIVES

    assert rules.DSPO_FORM_CHOICES == DSPO_FORMS and _field("dspo_form").metadata["choices"] == list(DSPO_FORMS)
    assert (rules.NOISING_MODES, rules.INVERSION_NETWORKS) == (inversion.NOISING_MODES, inversion.INVERSION_NETWORKS)
    loss_help = _field("loss_type").metadata["help"]
    assert [name for name in OBJECTIVES if f"`{name}`" not in loss_help] == []


# -- the rules over several fields: one table -------------------------------------------------------------------------

# (overrides breaking one rule, its message): every rule of rules.CROSS_FIELD_RULES, then the objectives' two
CROSS_FIELD_CASES = [
    ({"scale_lr": True}, "scale_lr=True reads learning_rate as a rate per pair .* which has no default"),
    (  # without the rule, transformers writes None where the DeepSpeed config says "auto"
        {"deepspeed": {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}},
        "learning_rate unset with deepspeed=<config file>: transformers writes learning_rate into the DeepSpeed",
    ),
    ({"resolution": 36}, r"resolution must be a positive multiple of 8 \(the VAE downsamples by 8\), got 36"),
    ({"min_timestep": 500, "max_timestep": 400}, r"max_timestep \(400\) must be larger than min_timestep \(500\)"),
    ({"cache_latents": True, "random_crop": True}, "cache_latents=True cannot be combined with random_crop=True"),
    ({"remove_unused_columns": True}, "remove_unused_columns=True would drop the image columns"),
    (
        {"safeguard_space": "update", "gradient_accumulation_steps": 2},
        "safeguard_space='update' needs gradient_accumulation_steps=1",
    ),
    ({"optim": "adamw_bnb_8bit"}, "optim='adamw_bnb_8bit' is a bitsandbytes 8-bit optimizer"),  # use_cpu: the base
    (
        {"optim": "adamw_torch_8bit", "safeguard_space": "update"},
        "safeguard_space='update' predicts .* optim='adamw_torch_8bit' keeps them block-quantized",
    ),
    ({"safeguard_scope": "pair"}, "safeguard_scope='pair' .* needs safeguard_space='parameter', got 'output'"),
    (
        {"safeguard_scope": "pair", "safeguard_space": "parameter", "safeguard_passes": "two"},
        "safeguard_scope='pair' needs safeguard_passes='one'",
    ),
    ({"safeguard_mu": "auto", "safeguard_space": "none"}, "safeguard_mu='auto' .* needs a safeguard_space other"),
    ({"on_pathology": "safeguard"}, "on_pathology='safeguard' .* needs safeguard_space='none'"),
    ({"on_pathology": "escalate", "safeguard_space": "none"}, "on_pathology='escalate' .* needs a safeguard_space"),
    ({"on_pathology": "rewind"}, r"on_pathology='rewind' reads the held-out probe: set probe_steps"),
]
OBJECTIVE_CASES = [
    ({"loss_type": "dspo", "auto_beta": True}, "auto_beta acts on the Diffusion-DPO logit .* got loss_type='dspo'"),
    ({"loss_type": "dmpo", "max_margin": 5.0}, "max_margin acts on the Diffusion-DPO logit .* got loss_type='dmpo'"),
    ({"loss_type": "mapo", "sft_weight": 0.5}, "sft_weight acts on the Diffusion-DPO logit .* got loss_type='mapo'"),
    ({"loss_type": "mapo", "safeguard_mu": "auto"}, "safeguard_mu='auto' .* loss_type='mapo' runs no reference"),
    ({"loss_type": "sft"}, "loss_type='sft' trains on the winners only: .* Set safeguard_space='none'."),
    ({"loss_type": "dspo", "loss_mask": True}, "loss_mask masks the denoising errors, but loss_type='dspo"),
    (
        {"loss_type": "mapo", "noising": "inversion", "inversion_network": "reference"},
        "inversion_network='reference' needs a reference model, and loss_type='mapo' uses none",
    ),
]


def test_every_rule_of_the_table_has_a_case():
    assert len(CROSS_FIELD_CASES) == len(rules.CROSS_FIELD_RULES)
    for rule, (overrides, _) in zip(rules.CROSS_FIELD_RULES, CROSS_FIELD_CASES):
        assert set(overrides) <= set(rule.fields) | {"safeguard_space"}, rule.fields


@pytest.mark.parametrize(("overrides", "message"), CROSS_FIELD_CASES)
def test_a_config_breaking_a_rule_over_several_fields_is_refused_when_made(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


@pytest.mark.parametrize(("overrides", "message"), OBJECTIVE_CASES)
def test_the_objective_refuses_what_it_cannot_run_when_the_config_is_made(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_the_trainer_checks_the_objective_again_for_a_field_changed_since(
    make_config, make_pipeline, pickapic_dataset
):
    from tests.helpers.common import lora_config
    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    config = make_config(loss_type="dmpo")
    config.dmpo_alpha = -1.0
    with pytest.raises(ValueError, match=r"dmpo_alpha must lie in \(0, 1\), got -1.0"):
        DiffusionSDPOTrainer(make_pipeline(), args=config, train_dataset=pickapic_dataset, peft_config=lora_config())


@pytest.mark.parametrize(
    "overrides",
    [
        {"safeguard_space": "none", "gradient_accumulation_steps": 2},
        {"safeguard_space": "none", "safeguard_scope": "pair"},
        {"safeguard_space": "none", "loss_type": "sft"},
        {"loss_type": "mapo", "noising": "inversion", "inversion_network": "policy"},
    ],
)
def test_the_safeguards_rules_bind_only_with_the_safeguard_on(tmp_path, overrides):
    from trl_diffusion_sdpo.objectives import check_objective_config

    check_objective_config(DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides))


@pytest.mark.parametrize(("overrides", "message"), CROSS_FIELD_CASES)
def test_the_table_is_the_only_place_that_checks_these_rules(tmp_path, monkeypatch, overrides, message):
    """With the table emptied each of its rules' configs is accepted: no second copy of the rule in the config."""
    monkeypatch.setattr(rules, "CROSS_FIELD_RULES", ())
    if "resolution" in overrides:  # the field's own range still holds; the multiple of 8 is the table's
        assert rules.FIELD_RULES["resolution"].check("resolution", overrides["resolution"]) == 36
    DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)


# -- the config's rules import nothing above the config ---------------------------------------------------------------


def test_the_rules_load_no_module_by_name():
    """rules.py checks what the config owns and asks the objective through the one check the package's root connects
    (no importlib, no registry of checks filled by whatever was imported)."""
    source = pathlib.Path(rules.__file__).read_text()
    assert "importlib" not in source and "import_module" not in source
    assert not hasattr(rules, "register_config_check") and not hasattr(rules, "CHECK_OWNERS")
    assert rules.objective_check.__module__ == "trl_diffusion_sdpo"


@pytest.mark.slow  # a fresh interpreter; by default: the train command's refusal below, in a fresh interpreter too
def test_a_config_made_first_thing_in_a_fresh_interpreter_asks_the_objective(tmp_path):
    """Whatever was imported before (here: the config's module alone), the chosen objective checks its fields."""
    import subprocess
    import sys

    from tests.helpers.common import worker_environment

    script = (
        "from trl_diffusion_sdpo.config.fields import DiffusionSDPOConfig\n"
        "try:\n"
        f"    DiffusionSDPOConfig(output_dir={str(tmp_path)!r}, use_cpu=True, loss_type='dmpo', dmpo_alpha=-1)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=worker_environment()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("dmpo_alpha must lie in (0, 1), got -1."), done.stdout


@pytest.mark.parametrize(("flags", "message"), [(["--beta", "-1"], "beta must be positive, got -1.0")])
def test_the_train_command_refuses_an_objectives_field_before_loading_anything(tmp_path, flags, message):
    """In a fresh process (nothing of the package imported, nothing registered before the command runs: a child of
    tests.helpers.fresh_forks' interpreter, the libraries' imports made) the command line still refuses a value an
    objective owns as a bad flag, before it looks for the model (no --model_name_or_path is given)."""
    from tests.helpers import fresh_forks

    done = fresh_forks.run(
        ["-m", "trl_diffusion_sdpo", "train", *flags, "--output_dir", str(tmp_path), "--use_cpu"], cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"trl-diffusion-sdpo train: error: {message}")


@pytest.mark.parametrize("space", ["output", "parameter"])
def test_the_default_global_scope_computes_the_local_lambda_on_one_process(make_trainer, space):
    """On one process the default scope (global, which every engine runs) is the local scope's computation: the same
    lambdas and the same trained weights, bit for bit."""
    import torch

    runs = {}
    for scope in ("local", "global"):
        trainer = make_trainer(safeguard_space=space, safeguard_scope=scope, max_steps=2)
        trainer.train()
        lambdas = [h["safeguard/lambda_mean"] for h in trainer.state.log_history if "safeguard/lambda_mean" in h]
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[scope] = (lambdas, weights)
    assert runs["local"][0] == runs["global"][0] and runs["local"][0]
    for name, value in runs["local"][1].items():
        assert torch.equal(value, runs["global"][1][name]), name


@pytest.mark.parametrize(
    "online,cuda,cpus,processes,workers",
    [(False, True, 32, 1, DATA_WORKERS), (False, True, 6, 4, 1), (False, True, 2, 1, 2), (False, False, 32, 1, 0),
     (True, True, 32, 1, 0)],
)  # fmt: skip
def test_data_loading_overlaps_the_gpus_step_offline_only(tmp_path, online, cuda, cpus, processes, workers):
    """Workers (at most the cores per process, at least one) and non-blocking copies where a GPU runs an offline
    step; none on the CPU or online: each config's own choice."""
    from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

    config = (OnlineDiffusionSDPOConfig if online else DiffusionSDPOConfig)(output_dir=str(tmp_path), use_cpu=True)
    chosen = config.data_loading_defaults(cuda=cuda, cpus=cpus, processes=processes)
    run = "online" if online else "offline"
    assert chosen == {"dataloader_num_workers": workers, "non_blocking": cuda and not online, "run": run}
    if not online:
        assert data_loading_defaults(cuda=cuda, cpus=cpus, processes=processes) == {
            "dataloader_num_workers": workers,
            "non_blocking": cuda,
        }


def test_the_config_asks_the_machine_nothing(tmp_path, monkeypatch):
    """Made with the machine's cores and GPU out of reach, the config holds the same values: transformers' own for
    the data loading, whatever the machine."""

    def asked(*args):
        raise AssertionError("the config asked the machine")

    monkeypatch.setattr(os, "sched_getaffinity", asked, raising=False)
    monkeypatch.setattr(os, "cpu_count", asked)
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert config.dataloader_num_workers == 0 and not config.accelerator_config.non_blocking


@pytest.mark.parametrize("cuda", [False, True])
def test_the_trainers_copy_takes_the_data_loading_choice_for_its_device(tmp_path, cuda):
    """The trainer's copy takes the data-loading choice for its device where the caller left it unset, each choice
    with its reason; the caller's config and a given value are kept."""
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    config.dataloader_pin_memory = True  # transformers' default where a GPU is found
    device = "cuda" if cuda else "cpu"
    chosen, choices = machine_choices(config, device_type=device, terminal=True, cpus=16, processes=1)
    assert chosen.dataloader_num_workers == (DATA_WORKERS if cuda else 0)
    assert chosen.accelerator_config.non_blocking is cuda
    assert config.dataloader_num_workers == 0 and not config.accelerator_config.non_blocking  # the caller's
    workers = choices["dataloader_num_workers"]
    assert (workers.scope, workers.value) == (MACHINE, DATA_WORKERS if cuda else 0)
    assert workers.text().startswith(f"dataloader_num_workers={workers.value} (this machine: {device}, offline")
    given = DiffusionSDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, dataloader_num_workers=3, accelerator_config={}
    )
    kept, choices = machine_choices(given, device_type=device, terminal=True, cpus=16, processes=1)
    assert kept.dataloader_num_workers == 3 and not kept.accelerator_config.non_blocking
    assert choices["dataloader_num_workers"].text() == "dataloader_num_workers=3 (as given)"
    config.dataloader_num_workers = 2  # changed after the config was made: the caller's, kept
    assert machine_choices(config, device_type=device, terminal=True, cpus=16)[0].dataloader_num_workers == 2
    help_text = " ".join(DiffusionSDPOConfig.__dataclass_fields__["dataloader_num_workers"].metadata["help"].split())
    assert f"where a GPU runs an offline step {DATA_WORKERS} workers" in help_text


@pytest.mark.parametrize(
    ("terminal", "given", "shown"), [(True, None, True), (False, None, False), (False, False, True)]
)
def test_off_a_terminal_the_trainers_copy_prints_a_line_per_log_unless_the_caller_chose(
    tmp_path, terminal, given, shown
):
    # transformers leaves disable_tqdm unset only at its default verbosity (another test may have quieted it)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    try:
        config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, disable_tqdm=given)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    chosen, choices = machine_choices(config, device_type="cpu", terminal=terminal, cpus=2)
    assert chosen.disable_tqdm is not shown
    assert config.disable_tqdm is False  # the caller's, as transformers made it
    assert ("disable_tqdm" in choices) is not shown


def test_the_trainer_writes_no_field_of_the_callers_config(make_config, make_pipeline, pickapic_dataset):
    """An unset learning rate: the trainer's copy takes the family's rate; the caller's config keeps every field as it
    was made (the trainer chooses nothing per machine: test_machine_choices.py)."""
    from tests.helpers.common import lora_config
    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    config = make_config(learning_rate=None)
    before = config.to_dict()
    trainer = DiffusionSDPOTrainer(
        make_pipeline(), args=config, train_dataset=pickapic_dataset, peft_config=lora_config()
    )
    assert config.to_dict() == before
    assert trainer.args.learning_rate == 1e-5
