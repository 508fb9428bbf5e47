"""The suite's own layout: ``tests/`` is a package whose shared code lives in ``tests/helpers/``; no test module
imports another test module or ``conftest``, so a test module's tests run only where it is collected and a helper has
one home."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.common import CHECKOUT, worker_environment
from tests.helpers.source_scans import parsed

ROOT = Path(__file__).resolve().parents[2]
SUITES = [ROOT / "tests", ROOT / "rewards" / "tests", ROOT / "benchmarks" / "tests"]


def imported_test_modules(source: str, test_modules: frozenset[str] = frozenset()) -> list[str]:
    """The test modules (``test_*``) and ``conftest`` modules a module's source imports, at any depth; and the string
    constants that name one of ``test_modules`` (module names, bare or dotted), which ``importlib`` would import."""
    found = []
    for node in ast.walk(parsed(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and node.value in test_modules:
            found.append(node.value)
        found += [n for n in names if n.rsplit(".", 1)[-1].startswith("test_") or n.rsplit(".", 1)[-1] == "conftest"]
    return found


def suite_module_names() -> frozenset[str]:
    """Every test module's name, bare (``test_wan``) and dotted from the root (``tests.families.test_wan``)."""
    paths = [p.relative_to(ROOT).with_suffix("") for suite in SUITES for p in suite.rglob("test_*.py")]
    return frozenset(name for p in paths for name in (p.name, ".".join(p.parts)))


def test_no_module_of_the_suites_imports_a_test_module_or_a_conftest() -> None:
    names = suite_module_names()
    offenders = {
        str(path.relative_to(ROOT)): found
        for suite in SUITES
        for path in sorted(suite.rglob("*.py"))
        if (found := imported_test_modules(path.read_text(), names))
    }
    assert not offenders, f"move what these share into tests/helpers/: {offenders}"


def test_tests_is_a_package_down_to_every_area() -> None:
    folders = [ROOT / "tests", *(p.parent for p in (ROOT / "tests").rglob("test_*.py")), ROOT / "tests" / "helpers"]
    missing = sorted({str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()})
    assert not missing, f"no __init__.py in {missing}"


@pytest.mark.parametrize(
    "source",
    [
        "from test_docs import RESULT_FILE",
        "from tests.docs.test_docs import RESULT_FILE",
        "def f():\n    from test_wan import video_rows",
        "import test_layering",
        "from conftest import pickapic_rows",
    ],
)
def test_the_check_finds_a_planted_import(source: str) -> None:
    assert imported_test_modules(source)


def test_the_check_finds_a_test_module_named_for_importlib() -> None:
    """A name handed to ``importlib.import_module`` through a variable: this very module, bare and dotted."""
    names = suite_module_names()
    bare, dotted = Path(__file__).stem, f"tests.docs.{Path(__file__).stem}"
    assert {bare, dotted} <= names
    source = "import importlib\n\nCASES = {{'x': lambda: importlib.import_module(NAMES['x']).CASE}}\n"
    source += "NAMES = {{'x': {!r}}}\n"
    assert imported_test_modules(source.format(bare), names) == [bare]
    assert imported_test_modules(source.format(dotted), names) == [dotted]
    assert imported_test_modules(source.format("tests.helpers.video"), names) == []


def test_the_check_leaves_a_helper_import() -> None:
    assert imported_test_modules("from tests.helpers.common import pickapic_rows\nimport pytest\n") == []


def test_a_worker_imports_the_package_of_the_checkout_under_test(tmp_path) -> None:
    """Without site-packages (``-S``: no installed or editable copy to fall back on), from another folder, a process
    started with :func:`worker_environment` finds the package in this checkout."""
    code = "import importlib.util; print(importlib.util.find_spec('trl_diffusion_sdpo').origin)"
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], env=worker_environment(), cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == CHECKOUT / "trl_diffusion_sdpo" / "__init__.py"


# What the suite's fixtures and tests import; a conftest that loaded one would make xdist's controller pay for it
# before it starts the workers.
HEAVY = ("torch", "datasets", "transformers", "diffusers", "peft", "trl_diffusion_sdpo", "tests.helpers.fixtures")


def test_the_conftests_import_no_library_so_xdist_starts_its_workers_at_once() -> None:
    """xdist's controller imports every conftest of the suites pytest collects and runs no test: in a fresh
    interpreter, the conftests import none of :data:`HEAVY` (the fixtures plugin, :mod:`tests.helpers.fixtures`, is
    loaded by the processes that run tests)."""
    conftests = [str(p) for suite in SUITES[:2] for p in sorted(suite.rglob("conftest.py"))]
    code = (
        "import importlib.util, sys\n"
        "for i, path in enumerate(sys.argv[1:]):\n"
        "    spec = importlib.util.spec_from_file_location(f'conftest_{i}', path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        f"print(sorted(set(sys.modules) & set({HEAVY!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *conftests], env=worker_environment(), cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert len(conftests) >= 3 and done.stdout.strip() == "[]", (conftests, done.stdout)
