"""Config validation fails early with a message that says what to change; learning-rate scaling."""

from __future__ import annotations

import pytest

from trl_diffusion_sdpo import DiffusionSDPOConfig


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
        ({"on_nonfinite_loss": "ignore"}, "on_nonfinite_loss"),
        ({"loss_type": "ipo"}, "loss_type"),
        ({"remove_unused_columns": True}, "remove_unused_columns"),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    for value in overrides.values():
        if not isinstance(value, bool):
            assert str(value) in str(info.value)  # the offending value is quoted back


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

    config = make_config(scale_lr=True, learning_rate=1e-5, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2)
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
