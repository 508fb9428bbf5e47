"""Run control reads the trainer's public surface, and the online run's differences live in its subclasses: no module
of ``callbacks/`` reads a private attribute of the trainer (``trainer._x``, ``self.trainer._x``,
``getattr(trainer, "_x")``), and no module outside ``online/`` reads ``is_online``. The counting
(``tests/helpers/source_scans.py``) is also benchmarks/tools/reviewer_figures.py's, which reports the figures for the
whole package."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.source_scans import is_online_reads_in, private_trainer_reads_in

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


def test_no_callback_reads_a_private_attribute_of_the_trainer():
    found = {
        str(path.relative_to(ROOT)): reads
        for path in sorted((PACKAGE / "callbacks").rglob("*.py"))
        if (reads := private_trainer_reads_in(path.read_text()))
    }
    assert not found, f"read the trainer's public properties and methods instead: {found}"


def test_no_module_outside_online_reads_is_online():
    assert is_online_reads_in("def f(args):\n    return args.is_online or getattr(args, 'is_online', 0)\n") == [2, 2]
    found = {
        str(path.relative_to(ROOT)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if (PACKAGE / "online") not in path.parents and (lines := is_online_reads_in(path.read_text()))
    }
    assert not found, f"move what differs online into OnlineDiffusionSDPOTrainer / OnlineDiffusionSDPOConfig: {found}"
