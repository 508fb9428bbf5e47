"""The documentation site builds with ``mkdocs build --strict``: every page in the nav, every link and anchor
resolved, the API reference generated from docstrings without a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    site = tmp_path / "site"
    for page in ("quickstart", "concepts", "data", "families", "distributed", "evaluation", "benchmarks", "faq"):
        assert (site / page / "index.html").is_file(), page
    trainer_api = (site / "api" / "trainer" / "index.html").read_text()
    assert "DiffusionSDPOTrainer" in trainer_api and "create_model_card" in trainer_api
    assert "safeguard_mu" in (site / "api" / "config" / "index.html").read_text()
