"""The trainers use transformers.Trainer through its public hooks: at most three private methods are overridden, each
named here with the reason it has no public equivalent, and the package reads none of Trainer's private state."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import Trainer

import trl_diffusion_sdpo
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.online.trainer import OnlineDiffusionSDPOTrainer

# The private Trainer methods the trainer overrides (see the comment above them in trainer.py): a checkpoint is marked
# complete after transformers' save, so the save itself; transformers' loaders read only its own and peft's weight
# files. transformers' Hub push runs as it is.
ALLOWED = {"_save_checkpoint", "_load_from_checkpoint", "_load_best_model"}
# The online trainer's prompt sampler repeats each block num_iterations times, as TRL's GRPOTrainer's does through the
# same method.
ONLINE_ALLOWED = ALLOWED | {"_get_train_sampler"}
MAX_PRIVATE_OVERRIDES = 3


def private_trainer_methods() -> set[str]:
    """Every private (single-underscore) method transformers.Trainer defines or inherits."""
    return {
        name
        for name, value in inspect.getmembers(Trainer)
        if name.startswith("_") and not name.startswith("__") and callable(value)
    }


def overridden_private_methods(cls: type) -> set[str]:
    """The private Trainer methods a class between ``cls`` and Trainer defines again."""
    private = private_trainer_methods()
    found: set[str] = set()
    for klass in cls.__mro__:
        if klass is Trainer:
            break
        found |= private & set(vars(klass))
    return found


@pytest.mark.parametrize(
    "cls,allowed",
    [(DiffusionSDPOTrainer, ALLOWED), (OnlineDiffusionSDPOTrainer, ONLINE_ALLOWED)],
    ids=["offline", "online"],
)
def test_the_trainers_override_only_the_allowed_private_trainer_methods(cls, allowed):
    overridden = overridden_private_methods(cls)
    assert overridden <= allowed, sorted(overridden - allowed)


def test_the_offline_trainer_overrides_at_most_three_private_trainer_methods():
    assert len(ALLOWED) <= MAX_PRIVATE_OVERRIDES
    assert len(overridden_private_methods(DiffusionSDPOTrainer)) <= MAX_PRIVATE_OVERRIDES


def test_the_private_method_count_sees_an_override_added_by_a_subclass():
    """The count is of what a class defines, wherever in its bases: a subclass overriding one more is caught."""

    class Reaching(DiffusionSDPOTrainer):
        def _save_rng_state(self, output_dir):  # noqa: ANN001, ANN202
            return None

    assert overridden_private_methods(Reaching) == overridden_private_methods(DiffusionSDPOTrainer) | {
        "_save_rng_state"
    }


def trainer_private_state() -> set[str]:
    """Private attributes transformers.Trainer sets on itself (``self._name = ...`` in its source), and its private
    methods."""
    source = Path(inspect.getsourcefile(transformers.trainer)).read_text(encoding="utf-8")
    assigned = set(re.findall(r"\bself\.(_[a-z][a-z0-9_]*)\s*(?::[^=\n]+)?=(?!=)", source))
    return assigned | private_trainer_methods()


def test_no_module_of_the_package_reads_a_private_attribute_of_transformers_trainer():
    """Outside the three overrides (which are defined, not read), no ``x._name`` in the package names one of Trainer's
    private methods or attributes: the loss sums, the scaler and RNG savers, the pending Hub push, the output folder
    of a trial."""
    private = trainer_private_state() - ALLOWED - {"_get_train_sampler"}
    package = Path(trl_diffusion_sdpo.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                found.append(f"{path.relative_to(package)}:{node.lineno} .{node.attr}")
    assert found == []


def test_mixed_precision_leaves_accelerates_forward_in_place_and_samples_in_the_compute_dtype(
    make_pipeline, make_trainer
):
    """accelerate wraps the denoiser's forward (its autocast, float32 outputs) when training starts; the trainer never
    replaces that wrapper: outside train() a forward hook returns the outputs in bf16, as the pipeline's VAE takes
    them, and inside train() and evaluate() the outputs are accelerate's float32 again."""
    pipe = make_pipeline()
    trainer = make_trainer(pipeline=pipe, bf16=True, max_steps=1)
    trainer.train()
    unet = pipe.unet
    wrapper = unet.__dict__["forward"]  # accelerate's, put on the instance by accelerator.prepare
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 6, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.tensor([10, 500])
    outside = unet(sample, timesteps, encoder_hidden_states=text).sample
    with trainer.mixed_precision_forward.running():
        assert unet.__dict__["forward"] is wrapper
        inside = unet(sample, timesteps, encoder_hidden_states=text).sample
    assert unet.__dict__["forward"] is wrapper
    assert outside.dtype == torch.bfloat16 and inside.dtype == torch.float32
    torch.testing.assert_close(outside.float(), inside, rtol=0, atol=0)  # the autocast's values in another dtype
