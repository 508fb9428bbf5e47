"""The engines: which one an accelerator gets, and what each answers (the trainer asks, never checks)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from trl_diffusion_sdpo.engines import DeepSpeedEngine, FSDP1Engine, FSDP2Engine, PlainEngine, engine_for
from trl_diffusion_sdpo.safeguards.gradients import collectives_for
from trl_diffusion_sdpo.safeguards.gradients.deepspeed import DeepSpeedCollectives
from trl_diffusion_sdpo.safeguards.gradients.per_branch import BranchGradientSplitter
from trl_diffusion_sdpo.safeguards.gradients.zero3 import DeepSpeedZeRO3Collectives
from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward


def _accelerator(distributed_type=DistributedType.NO, zero_stage=None, fsdp2=False, processes=1):
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=plugin),
        is_fsdp2=fsdp2,
        distributed_type=distributed_type,
        num_processes=processes,
    )


@pytest.mark.parametrize(
    "accelerator, expected",
    [
        (_accelerator(), PlainEngine),
        (_accelerator(DistributedType.MULTI_GPU, processes=2), PlainEngine),
        (_accelerator(DistributedType.DEEPSPEED, zero_stage=2, processes=2), DeepSpeedEngine),
        (_accelerator(DistributedType.FSDP, fsdp2=True, processes=2), FSDP2Engine),
        (_accelerator(DistributedType.FSDP, processes=2), FSDP1Engine),
    ],
    ids=["single", "ddp", "zero2", "fsdp2", "fsdp1"],
)
def test_engine_for_picks_the_engine_of_the_accelerator(accelerator, expected):
    assert type(engine_for(accelerator)) is expected


def test_the_deepspeed_engine_knows_its_stage():
    assert engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=3)).stage == 3


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_parameter_space_runs_under_ddp_and_zero_1_2_in_either_scope(stage, scope):
    ddp = engine_for(_accelerator(DistributedType.MULTI_GPU, processes=2))
    zero = engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=stage, processes=2))
    for engine in (ddp, zero):
        assert ParameterSpaceBackward(engine, 0.5, 1.0, scope == "global").global_scope == (scope == "global")


def test_zero3_takes_the_exact_safeguard_in_one_pass_with_the_global_or_pair_scope():
    engine = engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=3, processes=2))
    collectives = collectives_for(engine)
    assert type(collectives) is DeepSpeedZeRO3Collectives
    zero2 = engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=2, processes=2))
    assert type(collectives_for(zero2)) is DeepSpeedCollectives  # the ZeRO-3 variant takes stage 3 only
    assert ParameterSpaceBackward(engine, 0.5, 1.0, global_scope=True).global_scope
    with pytest.raises(ValueError, match="ZeRO-3 needs safeguard_scope='global'.*multi_gpu.yaml.*deepspeed_zero2"):
        ParameterSpaceBackward(engine, 0.5, 1.0, global_scope=False)
    assert collectives.one_pass_reason() is None
    ParameterSpaceBackward(engine, 0.5, 1.0, False, pair_scope=True)
    ParameterSpaceBackward(engine, 0.5, 1.0, False, update_space=True)
    offloading = _accelerator(DistributedType.DEEPSPEED, zero_stage=3, processes=2)
    offload = {"offload_optimizer": {"device": "cpu"}}
    offloading.state.deepspeed_plugin.deepspeed_config = {"zero_optimization": offload}
    for space in ({}, {"update_space": True}):
        with pytest.raises(ValueError, match="offload_optimizer"):
            ParameterSpaceBackward(engine_for(offloading), 0.5, 1.0, global_scope=True, **space)


def test_fsdp1_is_refused_naming_the_alternatives():
    with pytest.raises(ValueError, match="FSDP1.*fsdp2.yaml"):
        ParameterSpaceBackward(engine_for(_accelerator(DistributedType.FSDP)), 0.5, 1.0, global_scope=True)


def test_fsdp2_takes_the_parameter_space_safeguard_with_the_global_or_pair_scope():
    engine = engine_for(_accelerator(DistributedType.FSDP, fsdp2=True, processes=2))
    with pytest.raises(ValueError, match="safeguard_scope='global'"):
        ParameterSpaceBackward(engine, 0.5, 1.0, global_scope=False)
    assert ParameterSpaceBackward(engine, 0.5, 1.0, global_scope=True).global_scope
    assert collectives_for(engine).one_pass_reason() is None
    ParameterSpaceBackward(engine, 0.5, 1.0, False, pair_scope=True)


def test_validation_sampling_is_refused_where_no_process_holds_the_whole_denoiser():
    engine_for(_accelerator()).check_validation_sampling()
    engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=2)).check_validation_sampling()
    for accelerator in (
        _accelerator(DistributedType.DEEPSPEED, zero_stage=3),
        _accelerator(DistributedType.FSDP, fsdp2=True),
    ):
        with pytest.raises(ValueError, match="ValidationCallback cannot sample"):
            engine_for(accelerator).check_validation_sampling()


def test_who_owns_the_gradients():
    assert not engine_for(_accelerator(DistributedType.MULTI_GPU)).manages_gradients
    assert engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=1)).manages_gradients
    assert engine_for(_accelerator(DistributedType.FSDP, fsdp2=True)).manages_gradients
    assert engine_for(_accelerator(DistributedType.DEEPSPEED, zero_stage=1)).skips_nonfinite_steps
    assert not engine_for(_accelerator()).skips_nonfinite_steps


def test_fsdp2_sets_the_accumulated_gradients_aside_and_adds_them_back():
    class Policy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.synced = False

        def set_requires_gradient_sync(self, value):
            self.synced = value

    policy = Policy()
    policy.weight.grad = torch.full((3,), 2.0)
    engine = collectives_for(engine_for(_accelerator(DistributedType.FSDP, fsdp2=True)))
    assert isinstance(engine.per_branch_store([policy.weight]), BranchGradientSplitter)
    accumulated = engine.set_aside_accumulated(policy, [policy.weight])
    assert policy.synced and policy.weight.grad is None  # the branches start from empty gradients
    policy.weight.grad = torch.full((3,), 0.5)  # what the branches left
    engine.restore_accumulated([policy.weight], accumulated)
    torch.testing.assert_close(policy.weight.grad, torch.full((3,), 2.5))


def test_plain_engine_leaves_accumulated_gradients_in_place_and_does_not_reduce_on_one_process():
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.full((2,), 3.0)
    engine = collectives_for(engine_for(_accelerator()))
    assert engine.set_aside_accumulated(torch.nn.Linear(1, 1), [weight]) is None
    engine.reduce_combined_gradients([weight], sync_gradients=True)
    torch.testing.assert_close(weight.grad, torch.full((2,), 3.0))
    winner_sq, cross = engine.reduce_branch_sums(torch.tensor(4.0), torch.tensor(1.0), global_scope=True)
    assert (float(winner_sq), float(cross)) == (4.0, 1.0)


@pytest.mark.parametrize(
    ("kind", "options"), [(DistributedType.DEEPSPEED, {"zero_stage": 3}), (DistributedType.FSDP, {"fsdp2": True})]
)
def test_the_default_scope_runs_the_exact_safeguard_under_zero3_and_fsdp2(kind, options):
    """A run that only adds --config_file deepspeed_zero3.yaml (or fsdp2.yaml) keeps working in the parameter space:
    the default safeguard_scope is one these engines take."""
    from trl_diffusion_sdpo.config import DiffusionSDPOConfig

    default = DiffusionSDPOConfig.__dataclass_fields__["safeguard_scope"].default
    engine = engine_for(_accelerator(kind, processes=2, **options))
    assert ParameterSpaceBackward(engine, 0.5, 1.0, global_scope=default == "global").global_scope
