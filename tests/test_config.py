"""Config validation fails early with a message that says what to change; learning-rate scaling."""

from __future__ import annotations

import pytest

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.checks import Choice


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"beta": 0.0}, "beta must be positive"),
        ({"beta": -10.0}, "beta must be positive"),
        ({"safeguard_mu": 1.5}, r"safeguard_mu must lie in \[0, 1\]"),
        ({"safeguard_mu": -0.1}, r"safeguard_mu must lie in \[0, 1\]"),
        ({"safeguard_max_lambda": 0.0}, "safeguard_max_lambda must be positive"),
        ({"resolution": 30}, "multiple of 8"),
        ({"resolution": 0}, "multiple of 8"),
        ({"proportion_empty_prompts": 1.2}, r"proportion_empty_prompts must lie in \[0, 1\]"),
        ({"min_timestep": -1}, "min_timestep"),
        ({"min_timestep": 500, "max_timestep": 500}, "max_timestep"),
        ({"on_nonfinite_loss": "ignore"}, r"on_nonfinite_loss must be one of \['skip', 'raise'\]"),
        ({"safeguard_space": "gradient"}, r"safeguard_space must be one of \['output', 'parameter', 'update'\]"),
        ({"safeguard_scope": "world"}, r"safeguard_scope must be one of \['local', 'global', 'pair'\]"),
        ({"loss_type": "ipo"}, "loss_type"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
        # Non-finite values, which used to make training skip every step and still "finish"
        ({"beta": float("nan")}, "beta must be finite"),
        ({"beta": float("inf")}, "beta must be finite"),
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
        # The other objective and data fields
        ({"dmpo_alpha": 1.0}, r"dmpo_alpha must lie in \(0, 1\)"),
        ({"mapo_snr_value": 0.0}, "mapo_snr_value must be positive"),
        ({"smpo_gamma": -1.0}, "smpo_gamma must be positive"),
        ({"smpo_gamma": 0.0}, "smpo_gamma must be positive"),  # every weight 0: the pairs would teach nothing
        ({"smpo_score_min": 0.3, "smpo_score_max": 0.2}, r"smpo_score_max \(0.2\) must be larger than smpo_score_min"),
        ({"dspo_form": "sd21"}, "dspo_form must be one of"),
        ({"mapo_beta": float("inf")}, "mapo_beta must be finite"),
        ({"resolution": 64.5}, "resolution must be an integer"),
        ({"max_timestep": 0}, "max_timestep must be >= 1"),
        ({"validation_guidance_scale": float("inf")}, "validation_guidance_scale must be finite"),
        # The flow-matching families' fields
        ({"flow_weighting_scheme": "uniform"}, r"flow_weighting_scheme must be one of \['logit_normal', .*\] or None"),
        ({"flow_shift": "dynamic"}, r"flow_shift must be one of \['scheduler', 'resolution', 'none'\] or None"),
        ({"flow_logit_std": 0.0}, "flow_logit_std must be positive"),
        ({"flow_logit_std": float("nan")}, "flow_logit_std must be finite"),  # passed the old `<= 0` check
        ({"max_sequence_length": 0}, "max_sequence_length must be >= 1"),
        ({"max_sequence_length": 77.5}, "max_sequence_length must be an integer or None"),
        # Wrong types, as a YAML file gives them
        ({"beta": "5e3"}, r"beta must be a real number, got '5e3' \(str\)\. \(In YAML"),
        ({"safeguard_mu": True}, "safeguard_mu must be a real number"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    for value in overrides.values():
        if not isinstance(value, bool):
            assert str(value) in str(info.value)  # the offending value is quoted back


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


def test_defaults_follow_the_papers(tmp_path):
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert config.beta == 5000.0
    assert config.safeguard and config.safeguard_mu == 0.9 and config.safeguard_max_lambda == 1.0
    assert config.learning_rate == 1e-8 and config.scale_lr
    assert config.max_grad_norm == 1.0 and config.proportion_empty_prompts == 0.2 and config.random_flip
    assert not config.remove_unused_columns


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
    from conftest import lora_config

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


def test_a_choice_lists_its_options_in_the_order_given():
    choice = Choice(("sd15", "sdxl", "flow"))
    assert choice.check("form", "sdxl") == "sdxl"
    with pytest.raises(ValueError) as info:
        choice.check("form", "sd21")
    assert str(info.value) == "form must be one of ['sd15', 'sdxl', 'flow'], got 'sd21'."
