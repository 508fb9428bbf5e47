"""docs/safeguard.md's table of the probe alarm's rates per group (between ``<!-- probe-alarm-carry:begin -->`` and
``<!-- probe-alarm-carry:end -->``) says what the recorded runs of
``benchmarks/results/probe/cpu-probe-alarm-carry.json`` say under the config's rule: rendered again here from the
records' readings and labels with the rule ``probe_alarm`` builds from the config's defaults, and compared with the
page, and with the research record's."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import alarm_choice
from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.callbacks.rewind import probe_alarm

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "probe" / "cpu-probe-alarm-carry.json"


def block(page: Path, start: str, end: str) -> str:
    return page.read_text().split(start, 1)[1].split(end, 1)[0].strip()


def test_the_pages_table_is_the_config_rules_on_the_recorded_runs():
    records = json.loads(RESULT.read_text())["analysis"]["records"]
    rule = probe_alarm(DiffusionSDPOConfig(output_dir="unused", use_cpu=True))
    table = alarm_choice.table(rule, records).strip()
    assert (
        block(ROOT / "docs" / "safeguard.md", "<!-- probe-alarm-carry:begin -->", "<!-- probe-alarm-carry:end -->")
        == table
    )
    record = block(
        ROOT / "benchmarks" / "research" / "alarm.md",
        "<!-- probe-alarm-carry-tables:start -->",
        "<!-- probe-alarm-carry-tables:end -->",
    )
    assert record.endswith(table)
