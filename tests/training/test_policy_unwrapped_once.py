"""The policy is unwrapped from its engine wrapper once per wrapper, not every step: accelerate's ``unwrap_model``
walks every module for compiled regions (milliseconds a call on a UNet), and a step needs the policy for the LoRA
reference (the adapter-disabled policy) and for the exact rule's passes."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch


@pytest.mark.parametrize("space", ["none", "parameter"])
def test_a_lora_run_unwraps_the_policy_a_fixed_number_of_times_whatever_its_length(make_trainer, space):
    calls = {}
    for steps in (2, 4):
        trainer = make_trainer(lora=True, max_steps=steps, safeguard_space=space)
        unwrap = trainer.accelerator.unwrap_model
        seen: list[object] = []

        def counting(model, *args, _unwrap=unwrap, _seen=seen, **kwargs):
            _seen.append(model)
            return _unwrap(model, *args, **kwargs)

        trainer.accelerator.unwrap_model = counting  # an instance attribute of this test's accelerator
        trainer.train()
        calls[steps] = len(seen)
        # the unwrapped policy is the trained denoiser, as accelerate's own lookup gives it
        assert trainer.policy is unwrap(trainer.model_wrapped)
    assert calls[2] == calls[4], calls  # none per step


def test_a_step_asking_with_the_module_and_with_its_wrapper_unwraps_each_once(make_trainer):
    """Under DDP a step asks with ``trainer.model`` (the LoRA reference) and with the engine's wrapper (the exact
    rule): both stay cached, so alternating between them unwraps nothing more."""
    trainer = make_trainer(lora=True, max_steps=1)
    unwrap = trainer.accelerator.unwrap_model
    seen: list[object] = []

    def counting(model, *args, **kwargs):
        seen.append(model)
        return unwrap(model, *args, **kwargs)

    trainer.accelerator.unwrap_model = counting
    wrapper = torch.nn.Sequential(trainer.model)  # another object in front of the same module
    for _ in range(3):
        assert trainer._unwrapped(trainer.model) is trainer.model
        trainer._unwrapped(wrapper)
    assert seen == [trainer.model, wrapper]


def test_a_wrapper_the_cache_has_seen_is_freed_once_nothing_else_holds_it(make_trainer):
    """The cache holds its wrappers weakly: a wrapper dropped by its owner (an engine's, replaced on a new
    ``train()``) is collected, and with it what it holds, rather than kept alive by the trainer for the run."""
    trainer = make_trainer(lora=True, max_steps=1)
    wrapper = torch.nn.DataParallel(trainer.model)  # a wrapper accelerate unwraps to the module it holds
    assert trainer._unwrapped(wrapper) is trainer.model
    gone = weakref.ref(wrapper)
    del wrapper
    gc.collect()
    assert gone() is None
