"""Run control reads the trainer's public surface, and the online run's differences live in its subclasses: binding a
probe reads exactly the trainer attributes docs/compose.md lists, every read recorded; the scan of private reads
(``trainer._x``, ``self.trainer._x``, ``getattr(trainer, "_x")``) finds each form; what differs online is the online
config's answer (``tests/training/test_config_decisions.py``). The counting (``tests/helpers/source_scans.py``) is
also benchmarks/tools/reviewer_figures.py's, which reports the figures for the whole package."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.helpers.source_scans import private_trainer_reads_in

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


def test_binding_a_probe_reads_exactly_the_trainer_attributes_the_docs_list(make_trainer, make_pickapic):
    """Every attribute of the trainer read while a probe binds to it (the config's on held-back pairs, a hand-built
    one on the eval split), is one docs/compose.md lists, and each one listed is read."""
    from trl_diffusion_sdpo.callbacks import ProbeCallback

    documented = documented_probe_reads()
    assert {"args", "probe_pieces"} <= documented
    held_back = make_trainer(train_dataset=make_pickapic(8), probe_steps=1, probe_pairs=2)
    split = make_trainer(train_dataset=make_pickapic(6), eval_dataset=make_pickapic(2), probe_pairs=2)
    probes = [(held_back, ProbeCallback.from_config(1, held_back.probe.held)), (split, ProbeCallback.held_out(1))]
    for trainer, probe in probes:
        recorder = ReadRecorder(trainer)
        probe.bind_to_trainer(recorder)
        assert probe.probe is not None and probe.probe.batch is not None  # built, its pairs collated and placed
        assert recorder.read == documented, (
            f"read but not listed: {sorted(recorder.read - documented)}; listed but not read: "
            f"{sorted(documented - recorder.read)}"
        )
