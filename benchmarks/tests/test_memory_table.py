"""docs/memory.md's fits-on table is what ``python benchmarks/tools/memory_table.py`` writes, and its measured cells
are the peaks their result files hold."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("memory_table", ROOT / "benchmarks" / "tools" / "memory_table.py")
memory_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory_table)
BEGIN, END, FAMILY_CONFIGS, MEASURED = (
    memory_table.BEGIN,
    memory_table.END,
    memory_table.FAMILY_CONFIGS,
    memory_table.MEASURED,
)
fits_on, table_markdown = memory_table.fits_on, memory_table.table_markdown
RESULTS = ROOT / "benchmarks" / "results"


def docs_table() -> list[str]:
    text = (ROOT / "docs" / "memory.md").read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip().splitlines()


def test_docs_table_rows_equal_the_generator_for_a_transformer_and_a_unet_family() -> None:
    generated = table_markdown(["Wan 2.1 1.3B", "SD 1.5"]).splitlines()
    docs = docs_table()
    assert generated[:2] == docs[:2]  # header
    for row in generated[2:]:
        assert row in docs, (
            f"docs/memory.md is stale: python benchmarks/tools/memory_table.py --write docs/memory.md\n{row}"
        )


@pytest.mark.slow
def test_docs_table_equals_the_generator() -> None:
    assert table_markdown().splitlines() == docs_table()
    assert len(docs_table()) == 2 + len(FAMILY_CONFIGS)


def test_measured_cells_hold_their_result_files_peaks() -> None:
    for (row, column), (gib, _, file) in MEASURED.items():
        report = json.loads((RESULTS / file).read_text())
        runs = report["runs"].values() if "runs" in report else [report]
        peaks = [
            cell["peak_memory_bytes"] / 2**30
            for run in runs
            for cells in run["cells"].values()
            for cell in cells.values()
            if cell.get("peak_memory_bytes")
        ]
        assert any(abs(peak - gib) < 0.01 for peak in peaks), (row, column, file)


def test_fits_on_keeps_a_tenth_of_each_card_free() -> None:
    assert fits_on(20.0) == "24 GB"  # 21.5 GB of 21.6 usable
    assert fits_on(20.2) == "48 GB"
    assert fits_on(118.0) == "141 GB"  # 126.7 GB of 126.9 usable
    assert fits_on(119.0) == "> 141 GB"
