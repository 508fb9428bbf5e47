"""``benchmarks/tools/weights_identity.py``: the clipping subclass sums the gradient norm in the optimizer's group
order, ``--taps-from``'s store is the one the exact safeguard runs, and a comparison reports each variant against the
before checkout.

Run with ``python -m pytest benchmarks/tests``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.tools import weights_identity  # noqa: E402


def test_optimizer_order_clipping_sums_the_norm_in_the_optimizers_group_order():
    # One large gradient and four small ones: their squares summed large-first round the small ones away, small-first
    # they add up to one unit in the last place of the norm, so the order the norms are summed in shows.
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1)) for _ in range(5)])
    big, *smalls = model
    big.grad = torch.ones(1)
    for p in smalls:
        p.grad = torch.full((1,), 2.0**-12)
    optimizer = torch.optim.SGD([{"params": smalls}, {"params": [big]}], lr=0.1)
    in_optimizer_order = [p for group in optimizer.param_groups for p in group["params"]]
    model_order_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    reference = [torch.nn.Parameter(torch.zeros(1)) for _ in in_optimizer_order]
    for r, p in zip(reference, in_optimizer_order):
        r.grad = p.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, 0.5)  # torch's own clipping, in the optimizer's order
    assert expected_norm != model_order_norm  # the case tells the two orders apart

    trainer = SimpleNamespace(optimizer=optimizer, args=SimpleNamespace(max_grad_norm=0.5))
    clipping = weights_identity._trainer_class("optimizer")
    norm = clipping._clip_grad_norm(trainer, model)

    assert norm == expected_norm
    for p, r in zip(in_optimizer_order, reference):
        assert torch.equal(p.grad, r.grad)


def test_the_package_clip_order_is_the_package_trainer():
    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    assert weights_identity._trainer_class("trainer") is DiffusionSDPOTrainer


def test_a_store_from_taps_from_runs_the_exact_safeguard_and_keeps_its_weights():
    from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

    built = []

    class Recording(OnePassBranchGradients):
        def __init__(self, module, parameters) -> None:
            built.append(len(parameters))
            super().__init__(module, parameters)

    swapped = weights_identity.fingerprint("parameter", lora=True, store_class=Recording)
    assert built, "the exact safeguard did not build the given store"
    assert swapped == weights_identity.fingerprint("parameter", lora=True)  # the same store's arithmetic: same bits


def test_taps_from_loads_that_commits_store_beside_the_packages():
    from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

    loaded = weights_identity._one_pass_store_class("HEAD")
    assert loaded.__name__ == "OnePassBranchGradients"
    assert loaded is not OnePassBranchGradients
    assert loaded.__module__.endswith("one_pass_before")


def test_a_comparison_reports_the_checkout_and_each_variant_against_before(tmp_path):
    before = {"a-full": {"sha256": "x", "sum": 1.0}, "a-lora": {"sha256": "y", "sum": 2.0}}
    after = {"a-full": {"sha256": "z", "sum": 1.5}, "a-lora": {"sha256": "y", "sum": 2.0}}
    variant = {"a-full": {"sha256": "x", "sum": 1.0}, "a-lora": {"sha256": "w", "sum": 1.75}}
    paths = {}
    for name, fingerprints in {"before": before, "after": after, "variant": variant}.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(fingerprints))
    out = tmp_path / "result.json"

    code = weights_identity.main(
        ["--compare", str(paths["before"]), str(paths["after"]), "--label", "old", "new", "--write", str(out)]
        + ["--variant", "--clip-order optimizer", str(paths["variant"]), "--note", "what it shows"]
    )

    result = json.loads(out.read_text())
    assert code == 1  # the checkout itself differs
    assert result["checkouts"] == ["old", "new"] and result["old"] == before and result["new"] == after
    assert result["cases"] == {
        "a-full": {"identical": False, "sum_difference": 0.5},
        "a-lora": {"identical": True, "sum_difference": 0.0},
    }
    run = result["variants"]["--clip-order optimizer"]
    assert run["cases"] == {
        "a-full": {"identical": True, "sum_difference": 0.0},
        "a-lora": {"identical": False, "sum_difference": -0.25},
    }
    assert run["fingerprints"] == variant
    assert run["command"] == "python benchmarks/tools/weights_identity.py --clip-order optimizer --out FILE"
    assert result["notes"] == ["what it shows"]
