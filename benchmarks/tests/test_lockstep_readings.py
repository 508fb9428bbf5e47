"""``benchmarks/tools/lockstep_readings.py``: short readings cut from a lock-step file's stored steps, by main-thread
CPU and by wall time, and the research record's table of them regenerated from the file it names."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from benchmarks.tools.lockstep_readings import readings, table

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "benchmarks" / "research" / "benchmarks.md"


def test_each_reading_summarises_its_own_block_of_rounds_by_each_measure():
    # 7 rounds in blocks of 3 (the seventh left out): the safeguard's step over Diffusion-DPO's of the same round
    dpo_cpu, dpo_wall = [2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 9.0], [1.0, 2.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    mine_cpu, mine_wall = [2.0, 2.2, 2.6, 4.0, 4.4, 6.0, 1.0], [1.0, 2.0, 4.0, 1.5, 0.5, 1.0, 3.0]
    rows = {
        "dpo": {"step_thread_cpu_s": dpo_cpu, "step_times_s": dpo_wall},
        "parameter": {"step_thread_cpu_s": mine_cpu, "step_times_s": mine_wall},
    }
    found = readings(rows, "parameter", 3)
    assert found["thread_cpu"]["median"] == [1.1, 1.1]
    assert found["thread_cpu"]["mean"] == [round(statistics.fmean([1.0, 1.1, 1.3]), 3), 1.2]
    assert found["wall"]["median"] == [1.0, 1.0]
    assert found["wall"]["mean"] == [1.0, 1.0]  # (1.5 + 0.5 + 1.0) / 3


def test_the_records_table_is_the_tools_reading_of_the_file_it_names():
    text = RECORD.read_text()
    blocks = re.findall(
        r"<!-- lockstep-readings: (\S+) (\S+) (\S+) (\d+) -->\n(.*?)\n<!-- /lockstep-readings -->", text, re.S
    )
    assert blocks, "the record has no table of short readings"
    for path, tuning, safeguard, pairs, shown in blocks:
        result = json.loads((ROOT / path).read_text())
        assert shown == table(result, tuning, safeguard, int(pairs)), path
