"""Run control reads the trainer's public surface, and the online run's differences live in its subclasses: building a
probe reads exactly the trainer attributes docs/compose.md lists, every read recorded; the scan of private reads
(``trainer._x``, ``self.trainer._x``, ``getattr(trainer, "_x")``) finds each form; what differs online is the online
config's answer (``tests/training/test_config_decisions.py``). The counting (``tests/helpers/source_scans.py``) is
also benchmarks/tools/reviewer_figures.py's, which reports the figures for the whole package."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from tests.helpers.source_scans import parsed, private_trainer_reads_in

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "trl_diffusion_sdpo"


def test_the_scan_finds_each_form_of_a_private_trainer_read():
    source = (
        "def f(trainer, self):\n"
        "    a = trainer._policy()\n"
        "    b = self.trainer._dtype\n"
        "    c = getattr(trainer, '_eval_collator', None)\n"
        "    d = trainer.policy, trainer.__class__, other._x\n"
        "    trainer._written = 1\n"
    )
    assert private_trainer_reads_in(source) == [(2, "_policy"), (3, "_dtype"), (4, "_eval_collator")]


class ReadRecorder:
    """The trainer, every attribute read through it recorded by name (methods included: a method the trainer runs
    reads the trainer itself, not through the recorder)."""

    def __init__(self, trainer: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name: str) -> Any:
        self.read.add(name)
        return getattr(self._trainer, name)


def documented_probe_reads() -> set[str]:
    """The trainer attributes docs/compose.md says building the probe reads (its ``probe-reads`` list)."""
    text = (ROOT / "docs" / "compose.md").read_text()
    listed = re.search(r"<!-- probe-reads -->(.*?)<!-- /probe-reads -->", text, re.S)
    assert listed, "docs/compose.md lists what the probe reads between <!-- probe-reads --> markers"
    return set(re.findall(r"^- `trainer\.(\w+)", listed.group(1), re.M))


def test_building_a_probe_reads_exactly_the_trainer_attributes_the_docs_list(make_trainer, make_pickapic):
    """Every attribute of the trainer read while a probe is built with it (on held-back pairs, as the config's, and
    on the eval split) is one docs/compose.md lists, and each one listed is read."""
    from trl_diffusion_sdpo.callbacks import ProbeCallback

    documented = documented_probe_reads()
    assert {"args", "probe_pieces"} <= documented
    held_back = make_trainer(train_dataset=make_pickapic(8), probe_steps=1, probe_pairs=2)
    split = make_trainer(train_dataset=make_pickapic(6), eval_dataset=make_pickapic(2), probe_pairs=2)
    for trainer, held in ((held_back, held_back.probe.held), (split, None)):
        recorder = ReadRecorder(trainer)
        probe = ProbeCallback.held_out(1, held, trainer=recorder)
        assert probe.probe is not None and probe.probe.batch is not None  # built, its pairs collated and placed
        assert recorder.read == documented, (
            f"read but not listed: {sorted(recorder.read - documented)}; listed but not read: "
            f"{sorted(documented - recorder.read)}"
        )


def callback_lookups_in(source: str) -> tuple[list[str], list[str]]:
    """``(binders, readers)`` of ``source``: the functions it defines named ``bind_to_trainer``, and the functions
    that read a trainer's ``callback_handler`` (``x.callback_handler``, ``getattr(x, "callback_handler", ...)``), each
    as ``Class.function`` (or the function alone at module level)."""
    binders, readers = [], []

    def visit(node: ast.AST, scope: list[str], function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name, inner = function, scope
            if isinstance(child, ast.ClassDef):
                inner = [*scope, child.name]
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = ".".join([*scope, child.name]) if function is None else function
                if child.name == "bind_to_trainer":
                    binders.append(".".join([*scope, child.name]))
            read = isinstance(child, ast.Attribute) and child.attr == "callback_handler"
            read |= (
                isinstance(child, ast.Call)
                and getattr(child.func, "id", None) == "getattr"
                and any(isinstance(a, ast.Constant) and a.value == "callback_handler" for a in child.args)
            )
            if read:
                readers.append(function or "<module>")
            visit(child, inner, name)

    visit(parsed(source), [], None)
    return binders, readers


def test_the_scan_finds_a_binder_and_each_form_of_a_handler_read():
    source = (
        "class A:\n"
        "    def bind_to_trainer(self, trainer):\n"
        "        return trainer.callback_handler.callbacks\n"
        "def f(trainer):\n"
        "    return getattr(trainer, 'callback_handler', None)\n"
    )
    assert callback_lookups_in(source) == (["A.bind_to_trainer"], ["A.bind_to_trainer", "f"])


def test_no_callback_is_bound_and_the_trainer_looks_callbacks_up_in_one_method():
    """No module of the package defines ``bind_to_trainer`` (a callback takes what it needs in its constructor or its
    events), and one method reads the registered callbacks, ``DiffusionSDPOTrainer.callbacks_of``: every lookup in the
    package goes through it."""
    binders, readers = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        found = callback_lookups_in(path.read_text())
        where = path.relative_to(ROOT).as_posix()
        binders += [f"{where}:{name}" for name in found[0]]
        readers += [f"{where}:{name}" for name in found[1]]
    assert binders == []
    assert readers == ["trl_diffusion_sdpo/trainer.py:DiffusionSDPOTrainer.callbacks_of"]
