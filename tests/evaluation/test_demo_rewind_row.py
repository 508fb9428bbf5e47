"""The breaking regime's rewinding row (``on_pathology="rewind"``): its probe reads pairs of its own, so it trains on
the other rows' data; its rewinds and stop are read from its own log into the summary, the table, the figure's label
and the run's reading; a row that stops early stands for the evaluation steps it did not reach with the weights it
stopped with."""

from __future__ import annotations

import numpy as np
import pytest

from trl_diffusion_sdpo.demo.methods import GUARDS
from trl_diffusion_sdpo.demo.recipe import BreakingRegime
from trl_diffusion_sdpo.demo.report import (
    format_breaking_table,
    history_from_logs,
    rewind_text,
    run_reading,
    summarise_breaking,
)
from trl_diffusion_sdpo.demo.run import EvaluateAt


def test_the_rewinding_row_sits_beside_diffusion_dpo_and_mu_0_5_with_the_probe_it_needs():
    assert list(GUARDS)[:3] == ["dpo", "sdpo-output-mu0.5", "guard-rewind"]
    rewind = GUARDS["guard-rewind"]
    fields = rewind.config_kwargs()
    assert fields["on_pathology"] == "rewind" and fields["probe_steps"] >= 1 and fields["safeguard_space"] == "none"
    assert rewind.probes and not any(GUARDS[key].probes for key in GUARDS if key != "guard-rewind")
    assert "guard-rewind" in BreakingRegime.full().methods


def _log(step: int, **extra: float) -> dict:
    return {"step": step, "loss": 0.6, "implicit_acc": 0.5, "delta/winner": 0.01, "delta/loser": 0.02, **extra}


def _regime_summary(rewind_history: dict) -> dict:
    regime = BreakingRegime(methods=("dpo", "guard-rewind"), max_steps=50, eval_steps=(25, 50))
    methods = [GUARDS["dpo"], GUARDS["guard-rewind"]]
    generator = np.random.default_rng(0)
    base = generator.uniform(0.8, 1.0, size=(6, 4))
    dpo = base - 0.05 + generator.normal(0, 0.01, size=base.shape)
    rewards = {"dpo": {25: dpo + 0.02, 50: dpo}, "guard-rewind": {25: base.copy(), 50: base.copy()}}
    histories = {"dpo": history_from_logs([_log(s) for s in range(1, 51)]), "guard-rewind": rewind_history}
    summary = summarise_breaking(regime, methods, rewards, base, histories, {"dpo": 1.0, "guard-rewind": 1.0}, {})
    return summary


def test_a_row_that_rewound_twice_and_stopped_reads_so_everywhere():
    logs = [_log(s) for s in range(1, 21)]
    logs[9]["health/rewind_to"], logs[9]["health/rewinds"] = 0.0, 1.0  # step 10: back to the start
    logs[19]["health/rewind_to"], logs[19]["health/rewinds"] = 5.0, 2.0  # step 20: back to step 5, then the stop
    history = history_from_logs(logs)
    assert history["rewinds"] == [[10, 0], [20, 5]]
    regime = _regime_summary(history)
    row = regime["methods"]["guard-rewind"]
    assert row["rewind"] == {"rewinds": [[10, 0], [20, 5]], "stopped_at": 20}
    assert "rewind" not in regime["methods"]["dpo"]
    assert rewind_text(row["rewind"]) == "rewind 10->0, 20->5, stop 20"
    table_row = next(line for line in format_breaking_table(regime).splitlines() if line.startswith(row["label"]))
    assert table_row.endswith("rewind 10->0, 20->5, stop 20")
    main = {"dpo": {"label": "Diffusion-DPO", "reward": {"n": 1}, "reward_change": {"mean": 0.0, "ci95": None}}}
    config = {"learning_rate": 2e-5, "max_steps": 50, "batch_size": 8}
    base = {"source": "shipped"}
    reading = run_reading({"methods": main, "config": config, "base": base, "breaking_regime": regime})
    against = row["reward_minus_dpo"]
    expected = (
        f"{row['label']} rewound at step 10 back to step 0 and at step 20 back to step 5, then stopped at step 20 "
        "with the last healthy weights (step 5's): held-out reward change +0.0000 [+0.0000, +0.0000] against the "
        "base, {:+.4f} [{:+.4f}, {:+.4f}] against Diffusion-DPO (above 0).".format(against["mean"], *against["ci95"])
    )
    assert expected in reading


def test_a_row_whose_alarm_stayed_quiet_says_so():
    history = history_from_logs([_log(s) for s in range(1, 51)])
    row = _regime_summary(history)["methods"]["guard-rewind"]
    assert row["rewind"] == {"rewinds": [], "stopped_at": None} and rewind_text(row["rewind"]) == "alarm quiet"


def test_a_run_that_stops_early_stands_for_the_evaluation_steps_it_did_not_reach(monkeypatch):
    evaluate = EvaluateAt([25, 50], held_out=[], recipe=None)
    sampled: list[int] = []

    def sample(step: int) -> None:
        sampled.append(step)
        evaluate.images[step], evaluate.rewards[step] = np.full((1,), step), np.full((1,), step / 100)

    monkeypatch.setattr(evaluate, "_sample", sample)
    state = type("State", (), {"global_step": 0})()
    for step in range(1, 21):  # stopped at step 20: neither evaluation step reached
        state.global_step = step
        evaluate.on_step_end(None, state, None)
    evaluate.on_train_end(None, state, None)
    assert sampled == [20]
    assert {step: int(image[0]) for step, image in evaluate.images.items()} == {20: 20, 25: 20, 50: 20}
    assert evaluate.rewards[50][0] == pytest.approx(0.2)

    finished = EvaluateAt([25, 50], held_out=[], recipe=None)
    monkeypatch.setattr(finished, "_sample", lambda step: (sampled.append(step), finished.images.update({step: 0})))
    sampled.clear()
    for step in range(1, 51):
        state.global_step = step
        finished.on_step_end(None, state, None)
    finished.on_train_end(None, state, None)
    assert sampled == [25, 50]  # a run that reached the end is not sampled again


class _Built(Exception):
    """Raised by the stand-in trainer once it has what the demo gave it."""


def test_the_rewinding_row_reads_its_own_probe_pairs_and_trains_on_the_other_rows_data(monkeypatch):
    from datasets import Dataset

    from trl_diffusion_sdpo.demo import run as run_module
    from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, load_base
    from trl_diffusion_sdpo.demo.recipe import DemoRecipe

    seen: dict[str, dict] = {}

    def trainer(pipeline, ref_model, args, train_dataset, eval_dataset=None, **kwargs):
        seen[current] = {"train": train_dataset, "eval": eval_dataset, "probe_steps": args.probe_steps}
        raise _Built

    monkeypatch.setattr(run_module, "DiffusionSDPOTrainer", trainer)
    base, _, _ = load_base(PretrainRecipe())
    pairs, probe_pairs = Dataset.from_list([{"prompt": "a"}]), Dataset.from_list([{"prompt": "b"}])
    recipe = DemoRecipe.quick()
    for current in ("dpo", "guard-rewind"):
        with pytest.raises(_Built):
            run_module.train_preference(base, pairs, recipe, GUARDS[current], 0, probe_pairs=probe_pairs)
    assert seen["dpo"] == {"train": pairs, "eval": None, "probe_steps": None}
    assert seen["guard-rewind"]["train"] is pairs and seen["guard-rewind"]["eval"] is probe_pairs
    assert seen["guard-rewind"]["probe_steps"] == GUARDS["guard-rewind"].config_kwargs()["probe_steps"]
