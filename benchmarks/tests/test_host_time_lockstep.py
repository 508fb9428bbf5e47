"""The lock-step measure's bookkeeping: the repeats' readings and the checkouts taking turns (no model is run)."""

from __future__ import annotations

import statistics
import threading

from benchmarks.speed.host_time_lockstep import Turns, repeats


def test_repeats_reads_each_block_of_rounds_by_its_median_ratio():
    dpo = [2.0] * 9
    # three repeats of three rounds: ratios (1.0, 1.3, 1.1), (0.9, 1.2, 1.0), (1.5, 1.05, 1.4)
    ratios = [1.0, 1.3, 1.1, 0.9, 1.2, 1.0, 1.5, 1.05, 1.4]
    mine = [r * d for r, d in zip(ratios, dpo)]
    result = repeats(mine, dpo, 3)
    assert result["readings"] == [1.1, 1.0, 1.4]
    assert result["median"] == 1.1
    assert (result["min"], result["max"]) == (1.0, 1.4)
    assert result["median_of_all_rounds"] == round(statistics.median(ratios), 4)
    assert result["quartiles"] == [round(q, 4) for q in statistics.quantiles([1.1, 1.0, 1.4], n=4)]


def test_repeats_leaves_out_an_incomplete_last_block():
    assert repeats([1.0] * 7, [1.0] * 7, 3)["readings"] == [1.0, 1.0]


def test_turns_alternate_blocks_of_rounds_between_processes(tmp_path):
    (tmp_path / "turn").write_text("after")
    log: list[tuple[str, int]] = []
    lock = threading.Lock()

    def process(label: str) -> None:
        turns = Turns(str(tmp_path), label, ["after", "before"], every=2, patience=30)
        for round_ in range(6):  # the warmup round, 4 timed rounds, the profiled round
            turns(round_)
            with lock:
                log.append((label, round_))
        turns.finish()

    threads = [threading.Thread(target=process, args=(label,)) for label in ("before", "after")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    blocks = []  # consecutive runs of one label
    for label, round_ in log:
        if not blocks or blocks[-1][0] != label:
            blocks.append((label, []))
        blocks[-1][1].append(round_)
    # the warmup round, then two rounds each, then the profiled round: one process at a time, taking turns
    expected = [("after", [0]), ("before", [0]), ("after", [1, 2]), ("before", [1, 2])]
    expected += [("after", [3, 4]), ("before", [3, 4]), ("after", [5]), ("before", [5])]
    assert blocks == expected
