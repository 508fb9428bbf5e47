"""``benchmarks/results/`` holds folders only, one per kind of measurement (``memory/``, ``gpu/``, ``cli/``, ...), and
in them only the result files the README, the docs or the studies' records (``benchmarks/research/``) quote; every
result path they, the benchmarks' README and scripts, CONTRIBUTING.md, CHANGELOG.md and the package quote exists (a
script's default output: its folder); superseded runs live in ``benchmarks/results/history/``. The suite itself
imports nothing from ``benchmarks/``."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

from tests.helpers.docs_pages import RESULT_FILE, _expand, result_folders
from tests.helpers.source_scans import parsed

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
# The pages whose quoting keeps a result file: the README, the docs and the studies' records.
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
    *sorted((ROOT / "benchmarks" / "research").glob("*.md")),
]
# CHANGELOG.md quotes no file for the check above (it also names result files that were removed), but a path it
# names must exist, as one the pages name.
QUOTING = [*DOCS, ROOT / "benchmarks" / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]
# Texts that name a result file a user or a test reads: the package's sources, help texts and shipped records.
PACKAGE = sorted(p for p in (ROOT / "trl_diffusion_sdpo").rglob("*") if p.suffix in (".py", ".txt", ".json"))
# The benchmarks' scripts: a path they name is also where a run writes (a default output, a usage line).
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if "tests" not in p.relative_to(ROOT).parts)
RESULT_PATH = re.compile(r"benchmarks/results/[\w{},*./-]*[\w}*]\.json")


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
    found = RESULT_PATH.findall(text)
    return [n for f in found for n in _expand(f) if not list(ROOT.glob(n))]


def files_at_the_top(results: Path = RESULTS) -> list[str]:
    """The files at the top level of a results folder, where only folders belong."""
    return sorted(p.name for p in results.iterdir() if not p.is_dir())


def unplaced_outputs(text: str) -> list[str]:
    """The ``benchmarks/results/...`` paths a script names that name no file and would not be written into one of
    the results' folders: a path at the top level, or in a folder that does not exist."""
    found = RESULT_PATH.findall(text)
    return [
        n
        for f in found
        for n in _expand(f)
        if not list(ROOT.glob(n)) and (n.count("/") < 3 or not (ROOT / n).parent.is_dir())
    ]


def test_the_top_of_the_results_holds_folders_only() -> None:
    assert result_folders(), "no result folders found"
    assert files_at_the_top() == [], (
        "benchmarks/results/ keeps each result file in the folder of what it measures (benchmarks/README.md, Result "
        "files): move these there with git mv and update the paths that name them"
    )


def layout_folders(text: str) -> list[str]:
    """The folders the benchmarks' README's table of the results' layout names (its rows' first cells)."""
    section = text.split("## Result files", 1)[1]
    return sorted(re.findall(r"^\| `([\w-]+)/` \|", section, flags=re.MULTILINE))


def test_the_benchmarks_readme_names_each_results_folder() -> None:
    named = layout_folders((ROOT / "benchmarks" / "README.md").read_text())
    assert named == [folder.name for folder in result_folders()], "benchmarks/README.md's Result files table"


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


def test_every_result_path_the_package_names_exists() -> None:
    assert PACKAGE, "no package files found"
    stale = {str(p.relative_to(ROOT)): found for p in PACKAGE if (found := missing_paths(p.read_text()))}
    assert not stale, f"result paths that name no file: {stale}"


def test_every_result_path_a_benchmark_script_names_is_a_file_or_a_results_folder() -> None:
    """A usage line or a default output names a kept file, or a new file in one of the results' folders (the
    scripts write ``cuda-...`` where a kept file names its GPU): never the top level."""
    assert SCRIPTS, "no benchmark scripts found"
    stale = {str(p.relative_to(ROOT)): found for p in SCRIPTS if (found := unplaced_outputs(p.read_text()))}
    assert not stale, f"result paths outside the results' folders: {stale}"


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


def test_the_layout_checks_find_a_file_at_the_top_and_a_script_writing_there(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "cpu-a-tiny.json").write_text("{}")
    assert files_at_the_top(tmp_path) == []
    (tmp_path / "cpu-b-tiny.json").write_text("{}")
    assert files_at_the_top(tmp_path) == ["cpu-b-tiny.json"]
    kept = "--out benchmarks/results/step-time/cpu-step-time-small.json"
    new = 'default="benchmarks/results/memory/cpu-new-run-tiny.json"'
    assert unplaced_outputs(f"{kept}\n{new}") == []
    top = 'default="benchmarks/results/cpu-new-run-tiny.json"'
    nowhere = "--json benchmarks/results/no-such-folder/cpu-new-run-tiny.json"
    assert unplaced_outputs(f"{top}\n{nowhere}") == [
        "benchmarks/results/cpu-new-run-tiny.json",
        "benchmarks/results/no-such-folder/cpu-new-run-tiny.json",
    ]


# ------------------------------------------------------------------------------------------- the suite's boundary

IMPORTERS = ("insert", "append", "extend", "spec_from_file_location", "run_path", "import_module", "SourceFileLoader")


def benchmark_imports(source: str) -> list[str]:
    """Where a module's source imports from ``benchmarks/``: an ``import benchmarks...`` statement, or a call that puts
    a ``benchmarks`` folder on ``sys.path`` or loads a file from it."""
    found = []
    for node in ast.walk(parsed(source)):
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
