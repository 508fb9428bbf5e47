"""The one pass's buffer is cut into as many pieces as it takes to hold it at the piece size, no fewer: a buffer
one weight over a whole number of pieces takes one piece more, so that no piece grows past ``PIECE_ELEMENTS`` on
average and the memory the pieces save (two pieces' rows at the activations' peak, not two gradients) stays saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trl_diffusion_sdpo.engines.memory import pieces
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

P = pieces.PIECE_ELEMENTS


@pytest.mark.parametrize("elements", [1, P - 1, P, P + 1, 2 * P + 1, 5 * P - 1, 12 * P + 1, 13 * P - 7])
def test_a_buffer_takes_the_fewest_pieces_that_hold_it_at_the_piece_size(elements: int) -> None:
    count = pieces.piece_count(elements)
    assert count * P >= elements, "the pieces, each of at most PIECE_ELEMENTS, cannot hold the buffer"
    assert (count - 1) * P < elements, "a piece more than the buffer needs"


def test_past_the_most_pieces_the_count_stops_there() -> None:
    assert pieces.piece_count(pieces.MAX_PIECES * P + 1) == pieces.MAX_PIECES
    assert pieces.piece_count(0) == 1


def test_the_stores_pieces_hold_at_most_the_piece_size_on_average(monkeypatch) -> None:
    """Ten layers of 8x8 weights and 8 biases (720 weights) in pieces of 100: eight pieces, not seven of about 103."""
    monkeypatch.setattr(pieces, "PIECE_ELEMENTS", 100)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(10)))
    store = OnePassBranchGradients(model, list(model.parameters()))
    with store.split(2):
        model(torch.randn(4, 8)).sum().backward()
    total = sum(p.numel() for p in model.parameters())
    assert total == 720
    assert len(store.pieces) == 8
    assert sum(piece.shape[1] for piece in store.pieces) == total
    assert total / len(store.pieces) <= 100
