"""The demo-time script's reading of its records, on synthetic ones: ``/usr/bin/time -v``'s report, the load samples
that fall inside each run, and the file it writes from them (without running the demo)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "smoke"))

import demo_time  # noqa: E402

REPORT = """\tCommand being timed: "trl-diffusion-sdpo demo --output-dir /tmp/x"
\tUser time (seconds): 222.27
\tSystem time (seconds): 8.03
\tPercent of CPU this job got: 24%
\tElapsed (wall clock) time (h:mm:ss or m:ss): {wall}
\tMaximum resident set size (kbytes): 885724
\tExit status: 0
"""


@pytest.mark.parametrize(("wall", "seconds"), [("15:33.43", 933.43), ("1:02:03", 3723.0), ("0:07.50", 7.5)])
def test_the_wall_clock_is_read_in_both_of_times_formats(wall: str, seconds: float) -> None:
    found = demo_time.parse_time_v(REPORT.format(wall=wall))
    assert found["wall_s"] == pytest.approx(seconds)
    assert (found["user_s"], found["system_s"], found["cpu_percent"]) == (222.27, 8.03, 24.0)
    assert found["max_rss_kib"] == 885724


def test_a_report_without_its_exit_status_is_refused() -> None:
    with pytest.raises(ValueError, match="exit_status"):
        demo_time.parse_time_v(REPORT.format(wall="0:01.00").replace("\tExit status: 0\n", ""))


def _records(folder: Path) -> dict[str, Path]:
    """Two runs' records: cold from t=1000 for 60 s, warm from t=1100 for 30 s; loads sampled every 10 s."""
    outputs = {}
    for name, start, wall in (("cold", 1000, "1:00.00"), ("warm", 1100, "0:30.00")):
        (folder / f"time-{name}.txt").write_text(REPORT.format(wall=wall))
        (folder / f"start-{name}.txt").write_text(f"{start}\n")
        (folder / f"load-{name}-before.txt").write_text("1.00 0.50 0.25 1/100 42\n")
        (folder / f"load-{name}-after.txt").write_text("3.00 2.00 1.00 1/100 43\n")
        outputs[name] = folder / f"demo-{name}"
        outputs[name].mkdir()
        timings = {"total_seconds": 50.0 if name == "cold" else 25.0}
        plan = {"training_runs": 14}
        (outputs[name] / "summary.json").write_text(json.dumps({"timings": timings, "environment": {}, "plan": plan}))
    # 2.0 .. 8.0 inside the cold run, 9.0 between the runs, 4.0 and 5.0 inside the warm one
    stamps = [(1010, 2.0), (1030, 8.0), (1060, 6.0), (1080, 9.0), (1110, 4.0), (1130, 5.0), (1150, 20.0)]
    (folder / "loadsamples.txt").write_text("".join(f"{t} {load} 1.0 1.0 1/100 44\n" for t, load in stamps))
    return outputs


def test_each_run_keeps_the_load_sampled_while_it_ran_and_its_own_timings(tmp_path: Path) -> None:
    record = demo_time.assemble(tmp_path, _records(tmp_path), note="synthetic")
    cold, warm = record["steps"]
    assert (cold["step"], cold["wall_s"], warm["step"], warm["wall_s"]) == ("cold", 60.0, "warm", 30.0)
    assert cold["load_1min_during"] == {"samples": 3, "min": 2.0, "median": 6.0, "max": 8.0}
    assert warm["load_1min_during"] == {"samples": 2, "min": 4.0, "median": 4.5, "max": 5.0}
    assert cold["cpu_s"] == pytest.approx(230.3)
    assert cold["load_average_before"] == [1.0, 0.5, 0.25] and warm["load_average_after"] == [3.0, 2.0, 1.0]
    assert cold["demo_timings"]["total_seconds"] == 50.0 and cold["max_rss_mib"] == pytest.approx(864.96, abs=0.05)
    assert cold["demo_plan"] == {"training_runs": 14}
    assert cold["command"] == f"trl-diffusion-sdpo demo --output-dir {tmp_path / 'demo-cold'}"
    assert record["load"].startswith("1-minute load average 2 to 8 during the runs")
    assert record["load_sample_interval_s"] == 20  # the samples' median spacing: 20, 30, 20, 30, 20, 20


def test_an_iso_start_is_read_as_the_same_instant() -> None:
    assert demo_time.unix_seconds("1970-01-01T00:16:40Z\n") == 1000.0 == demo_time.unix_seconds("1000\n")


def test_a_run_with_no_load_sample_inside_it_is_refused(tmp_path: Path) -> None:
    outputs = _records(tmp_path)
    (tmp_path / "loadsamples.txt").write_text("5000 1.0 1.0 1.0 1/100 44\n")
    with pytest.raises(ValueError, match="no load sample"):
        demo_time.assemble(tmp_path, outputs, note="")
