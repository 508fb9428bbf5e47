"""``benchmarks/results/`` holds, at its top level and in one folder per study, only the result files the README, the
docs or the studies' records (``benchmarks/research/``) quote; every result path they and the benchmarks' README quote
exists; superseded runs live in
``benchmarks/results/history/``. The suite itself imports nothing from ``benchmarks/``."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

from tests.helpers.docs_pages import RESULT_FILE, _expand, result_folders

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# Past this many files the top level is a list nobody reads: a study with several files gets its own folder.
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "benchmarks" / "research").glob("*.md")),
]
# CHANGELOG.md is left out: it also records result files that were removed.
QUOTING = [*DOCS, ROOT / "benchmarks" / "README.md"]


def quoted_results(text: str) -> list[str]:
    """Result files a text names in ``benchmarks/results/`` or a study's folder (not ``history/``): by path or bare
    name (``cpu-...``, ``cuda-...``), ``{a,b}`` expanded, ``*`` kept as a pattern."""
    names = []
    for found in RESULT_FILE.findall(text):
        for name in _expand(found):
            folder, base = name.rpartition("/")[::2]
            if "history" not in folder.split("/") and base.startswith(("cpu-", "cuda-")):
                names.append(base)
    return names


def current_results() -> list[Path]:
    """The result files at the top level of ``benchmarks/results/`` and in its studies' folders."""
    studies = [folder for folder in result_folders() if folder.name != "history"]
    return sorted([*RESULTS.glob("*.json"), *(f for folder in studies for f in folder.glob("*.json"))])


def unquoted(files: list[str], texts: list[str]) -> list[str]:
    """The files no text quotes (by name, or by a pattern that names more than the device)."""
    patterns = {name for text in texts for name in quoted_results(text)} - {"cpu-*.json", "cuda-*.json"}
    return [f for f in files if not any(fnmatch.fnmatchcase(f, p) for p in patterns)]


def missing_paths(text: str) -> list[str]:
    """The ``benchmarks/results/...`` paths a text quotes that name no file (``{a,b}`` and ``*`` resolved)."""
    found = re.findall(r"benchmarks/results/[\w{},*./-]*[\w}*]\.json", text)
    return [n for f in found for n in _expand(f) if not list(ROOT.glob(n))]


def test_every_result_file_is_quoted_in_the_readme_or_the_docs() -> None:
    files = sorted(p.name for p in current_results())
    assert files, "no result files found"
    left = unquoted(files, [page.read_text() for page in DOCS])
    assert not left, (
        f"quoted nowhere in README.md, docs/ or benchmarks/research/: {left}; quote them or move them to "
        "benchmarks/results/history/"
    )


@pytest.mark.parametrize("page", QUOTING, ids=[str(p.relative_to(ROOT)) for p in QUOTING])
def test_every_quoted_result_path_exists(page: Path) -> None:
    assert not missing_paths(page.read_text()), f"{page.relative_to(ROOT)} quotes result paths that do not exist"


def test_the_results_checks_find_an_unquoted_file_and_a_stale_path() -> None:
    texts = ["Timings: `benchmarks/results/step-time/cpu-step-time-small.json`, `cpu-one-pass-small-{2,4}pairs.json`.",
             "Every GPU run: `benchmarks/results/cuda-h100-*.json`; the bare `cpu-*.json` names no file."]  # fmt: skip
    files = ["cpu-step-time-small.json", "cpu-one-pass-small-2pairs.json", "cpu-one-pass-small-4pairs.json",
             "cuda-h100-step-time-sd15-4pairs.json"]  # fmt: skip
    assert unquoted(files, texts) == []
    assert unquoted([*files, "cpu-one-pass-small-8pairs.json"], texts) == ["cpu-one-pass-small-8pairs.json"]
    assert missing_paths(texts[0]) == []
    stale = "Before: `benchmarks/results/cpu-structure-small-2pairs-before.json` (now under history/)."
    assert missing_paths(stale) == ["benchmarks/results/cpu-structure-small-2pairs-before.json"]


# ------------------------------------------------------------------------------------------- the suite's boundary

IMPORTERS = ("insert", "append", "extend", "spec_from_file_location", "run_path", "import_module", "SourceFileLoader")


def benchmark_imports(source: str) -> list[str]:
    """Where a module's source imports from ``benchmarks/``: an ``import benchmarks...`` statement, or a call that puts
    a ``benchmarks`` folder on ``sys.path`` or loads a file from it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "benchmarks"]
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "benchmarks"
        ):
            found.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in IMPORTERS and re.search(r"""["']benchmarks\b""", ast.unparse(node)):
                found.append(ast.unparse(node))
    return found


def test_the_suite_imports_nothing_from_benchmarks() -> None:
    """The suite guards the package: a benchmark script or its harness may change or go without failing it
    (benchmarks/tests/ checks the scripts). Reading a result file is not an import."""
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if (found := benchmark_imports(path.read_text()))
    }
    assert not offenders, f"move what these need into tests/ (or the package): {offenders}"


@pytest.mark.parametrize(
    "source",
    [
        "from benchmarks.harness import lift_fsdp_cpu_gate",
        "import benchmarks.harness as harness",
        "def f():\n    from benchmarks import harness",
        'sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))',
        'sys.path.append(os.path.join(ROOT, "benchmarks", "speed"))',
        'spec = importlib.util.spec_from_file_location("x", ROOT / "benchmarks/speed/step_time.py")',
    ],
)
def test_the_boundary_check_finds_a_planted_import(source: str) -> None:
    assert benchmark_imports(source)


def test_the_boundary_check_leaves_reading_a_result_file() -> None:
    source = 'import json\nreport = json.loads((ROOT / "benchmarks" / "results" / "x.json").read_text())\n'
    assert benchmark_imports(source) == []
