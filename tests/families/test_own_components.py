"""A pipeline folder whose ``model_index.json`` names one of the package's own modules as a component's library (the
tiny Qwen-Image 2.1's text-only processor) loads through ``load_pipeline`` in a fresh process, where nothing has
imported that module yet (a child of an interpreter that imported only the libraries: ``tests.helpers.fresh_forks``);
a module of any other library the folder names is never imported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import fresh_forks
from trl_diffusion_sdpo.families.loading import import_own_components
from trl_diffusion_sdpo.testing import build_tiny_qwen_image21_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen21")
    build_tiny_qwen_image21_pipeline(seed=0, tokenizer_dir=str(folder / "tokenizer-src")).save_pretrained(folder / "p")
    index = json.loads((folder / "p" / "model_index.json").read_text())
    assert any(v[0].startswith("trl_diffusion_sdpo.") for v in index.values() if isinstance(v, list))
    return folder / "p"


def test_a_folder_naming_the_packages_own_component_loads_in_a_fresh_process(saved):
    code = (
        "import sys\n"
        "assert not [m for m in sys.modules if m.startswith('trl_diffusion_sdpo')]\n"
        "from trl_diffusion_sdpo.engines.collectives import load_pipeline\n"
        f"print(type(load_pipeline({str(saved)!r})).__name__)"
    )
    done = fresh_forks.run(["-c", code], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "QwenImage21Pipeline"


def test_another_library_a_folder_names_is_not_imported(saved, tmp_path, monkeypatch):
    """In this process: the planted module is importable (its folder on the path) and imported by no test before."""
    (tmp_path / "planted_component.py").write_text("open(__file__ + '.imported', 'w').close()\n")
    folder = tmp_path / "p"
    folder.mkdir()
    index = json.loads((saved / "model_index.json").read_text())
    index["extra"] = ["planted_component", "Anything"]
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "planted_component" not in sys.modules
    import_own_components(folder)
    assert "planted_component" not in sys.modules
    assert not (tmp_path / "planted_component.py.imported").exists()
