"""A process that replays a micro-batch with weight zero (every row of its own was invalid) joins the global
output-space ``lambda``'s reduction with nothing: through the trainer's training step, with a stand-in for the other
process, the ``lambda`` applied is the one the other process's pairs give alone."""

from __future__ import annotations

import torch

from trl_diffusion_sdpo.objectives import PreferencePredictions
from trl_diffusion_sdpo.safeguards import output as output_module
from trl_diffusion_sdpo.safeguards.output import output_space_lambda


def _other_process() -> PreferencePredictions:
    """The other process's residuals: its loser follows its winner (``sum(r_l r_w) > 0``), so lambda binds."""
    g = torch.Generator().manual_seed(3)
    target, winner = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    return PreferencePredictions(
        policy_winner=winner,
        policy_loser=winner + 0.5 * torch.randn(2, 4, 4, 4, generator=g),
        target_winner=target,
        target_loser=target,
    )


def test_a_replaying_process_adds_nothing_to_the_global_output_space_lambda(make_trainer, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    other = _other_process()
    sums: dict[str, torch.Tensor] = {}

    def keep(stacked: torch.Tensor) -> torch.Tensor:
        sums["other"] = stacked.clone()
        return stacked

    output_space_lambda(other, 0.5, 1.0, keep)  # [num, den, elements] the other process sends
    sent: list[torch.Tensor] = []

    def all_reduce_sum(stacked: torch.Tensor) -> torch.Tensor:  # this process's sums plus the other's
        sent.append(stacked.detach().clone())
        return stacked + sums["other"].to(stacked)

    monkeypatch.setattr(output_module, "all_reduce_sum", all_reduce_sum)
    trainer = make_trainer(lora=True, safeguard_space="output", safeguard_scope="global", safeguard_mu=0.5)
    applied: list[torch.Tensor] = []
    loser_weight = trainer.safeguard.loser_weight

    def recording(predictions, contributes):
        lam = loser_weight(predictions, contributes)
        applied.append(lam.detach().clone())
        return lam

    monkeypatch.setattr(trainer.safeguard, "loser_weight", recording)
    collate = trainer.data_collator
    good = collate([trainer.train_dataset[i] for i in range(2)])
    trainer.current_gradient_accumulation_steps = 1  # what train() sets for each accumulation window
    trainer.training_step(trainer.model, good)  # this process's own pairs: they count
    assert len(sent) == 1 and sent[0][2].item() > 0
    counted = applied[-1]
    trainer.training_step(trainer.model, collate([]))  # every row invalid: the last good micro-batch, weight zero
    assert len(sent) == 2
    assert torch.equal(sent[1], torch.zeros_like(sent[1]))  # it adds nothing to the reduction
    rule = trainer.safeguard.rule
    alone = output_space_lambda(other, rule.mu, rule.max_lambda)  # the other process's pairs, as one process
    torch.testing.assert_close(applied[-1], alone)
    assert 0.0 < alone.item() < 1.0  # the margin binds: a counted replay would give another lambda
    assert not torch.allclose(counted, alone)
