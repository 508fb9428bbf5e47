"""Each module readable whole: the trainer stays orchestration (it builds the parts once, then calls the stages in
order) within :data:`TRAINER_LIMIT` lines, and every other module of the package within :data:`MODULE_LIMIT`. A
module that grows past its limit moves the parts that are not its own onto the objects that own them (docs/design.md).
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.layering import ROOT

TRAINER_LIMIT = 450
MODULE_LIMIT = 600
TRAINER = "trainer.py"

# Modules over MODULE_LIMIT being split, each held at its present length: it may shrink, never grow, and its entry
# fails once the module fits, so that the list empties.
OVER_LIMIT: dict[str, int] = {}


def line_count(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def over_limit(package: Path, over: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """``{module: (lines, limit)}`` for each module of ``package`` longer than its limit, and for each entry of
    ``over`` (``OVER_LIMIT``'s form) whose module now fits within :data:`MODULE_LIMIT` (a stale entry)."""
    over = OVER_LIMIT if over is None else over
    found: dict[str, tuple[int, int]] = {}
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        limit = TRAINER_LIMIT if name == TRAINER else over.get(name, MODULE_LIMIT)
        lines = line_count(path)
        if lines > limit or (name in over and lines <= MODULE_LIMIT):
            found[name] = (lines, limit)
    return found


def test_the_trainer_and_every_module_fit_their_limits():
    found = over_limit(ROOT)
    assert not found, f"modules over their line limit, as (lines, limit), and stale OVER_LIMIT entries: {found}"


def test_a_module_over_its_limit_is_named(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / TRAINER).write_text("x = 1\n" * TRAINER_LIMIT)
    (package / "sub" / "fits.py").write_text("x = 1\n" * MODULE_LIMIT)
    assert over_limit(package, {}) == {}  # exactly at the limits: clean
    (package / TRAINER).write_text("x = 1\n" * (TRAINER_LIMIT + 1))
    (package / "sub" / "long.py").write_text("x = 1\n" * (MODULE_LIMIT + 1))
    assert over_limit(package, {}) == {
        TRAINER: (TRAINER_LIMIT + 1, TRAINER_LIMIT),
        "sub/long.py": (MODULE_LIMIT + 1, MODULE_LIMIT),
    }


def test_an_entry_over_the_limit_may_not_grow_and_goes_stale_once_the_module_fits(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "big.py").write_text("x = 1\n" * 700)
    assert over_limit(package, {"big.py": 700}) == {}
    assert over_limit(package, {"big.py": 699}) == {"big.py": (700, 699)}
    (package / "big.py").write_text("x = 1\n" * MODULE_LIMIT)
    assert over_limit(package, {"big.py": 700}) == {"big.py": (MODULE_LIMIT, 700)}
