"""Which base each stored result was measured on: the studies train the benchmark's base
(``stability_map.STUDY_BASE``), the shipped base's own evidence and the demo's figures the base that ships; the docs
name each by its recipe hash.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.studies.probe_z_runs import wide_recipe  # noqa: E402
from benchmarks.studies.stability_map import BASES, STUDY_BASE  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, recipe_hash, shipped_base_record  # noqa: E402

HASH = re.compile(r'"recipe_hash": "([0-9a-f]{16})"')
#: result files measured on the shipped base; every other file that records a base ran on the benchmark's
SHIPPED_RESULTS = ("cpu-demo-base-fidelity.json", "shipped-base")
SHIPPED_DORMANT = "cpu-stability-dormant-shipped-base.json"
#: result files that hold runs on the held-out model (``probe_z_runs.wide_recipe``) beside the benchmark base's
HELD_OUT_MODEL_RESULTS = ("cpu-probe-z-runs.json",)


def _recorded(path: Path) -> set[str]:
    return set(HASH.findall(path.read_text()))


def test_the_two_bases_are_the_shipped_recipe_and_a_shorter_one():
    assert BASES == {"benchmark": STUDY_BASE, "shipped": PretrainRecipe()}
    assert shipped_base_record()["recipe_hash"] == recipe_hash(PretrainRecipe()) != recipe_hash(STUDY_BASE)
    shorter = {"vae_steps": 500, "unet_steps": 1000}
    assert {k: v for k, v in STUDY_BASE.to_dict().items() if k not in shorter} == {
        k: v for k, v in PretrainRecipe().to_dict().items() if k not in shorter
    }


def test_every_stored_result_ran_on_the_base_its_name_says():
    study, shipped = recipe_hash(STUDY_BASE), recipe_hash(PretrainRecipe())
    held_out_model = recipe_hash(wide_recipe())
    found = {
        path: hashes for path in sorted((ROOT / "benchmarks/results").rglob("*.json")) if (hashes := _recorded(path))
    }
    assert len(found) >= 12
    for path, hashes in found.items():
        expected = {shipped} if any(name in path.name for name in SHIPPED_RESULTS) else {study}
        if path.name in HELD_OUT_MODEL_RESULTS:
            expected |= {held_out_model}
        assert hashes == expected, f"{path.relative_to(ROOT)} records {sorted(hashes)}, not {sorted(expected)}"
    # the demo's figures are the shipped base's
    assert _recorded(ROOT / "docs/images/demo_summary.json") == {shipped}


def test_the_docs_name_each_base_by_its_hash():
    demo = (ROOT / "docs/demo.md").read_text()
    what_it_does, benchmark = demo.split("## What it does", 1)[1], demo.split("### The benchmark's base", 1)[1]
    assert recipe_hash(PretrainRecipe()) in what_it_does.split("\n2. ", 1)[0]
    assert recipe_hash(STUDY_BASE) in benchmark.split("\n## ", 1)[0]
    assert "(../../docs/demo.md#the-benchmarks-base)" in (ROOT / "benchmarks/research/stability.md").read_text()


def test_the_demo_page_carries_the_shipped_bases_guard_and_dormant_tables():
    """docs/demo.md's blocks are the tables of the shipped base's result files, as the stability page's are of the
    benchmark's."""
    from benchmarks.studies import stability_dormant as dormant
    from benchmarks.studies import stability_guards as guards

    page = (ROOT / "docs/demo.md").read_text()
    folder = ROOT / "benchmarks/results/safeguard-comparison"
    for (start, end), text in (
        ((guards.TABLES_START, guards.TABLES_END), guards.tables(folder / "cpu-stability-guards-shipped-base.json")),
        ((dormant.DORMANT_START, dormant.DORMANT_END), dormant.dormant_tables(folder / SHIPPED_DORMANT)),
    ):
        block = page.split(start, 1)[1].split(end, 1)[0]
        assert block.strip() == text.strip(), f"stale: rewrite docs/demo.md's {start} block"


# -- the benchmark's base as stored: loaded from the repository, checked, outside the wheel -------------------------


def test_the_benchmarks_base_loads_from_its_stored_weights_and_never_pretrains(monkeypatch):
    import torch
    from safetensors.torch import load_file

    from benchmarks.studies import stability_map
    from trl_diffusion_sdpo.demo import pretrain

    def refuse(recipe):
        raise AssertionError("the benchmark's base was pretrained instead of loaded from benchmarks/study_base")

    monkeypatch.setattr(pretrain, "pretrain_base", refuse)
    assert stability_map.study_base_problem() is None
    record = shipped_base_record(stability_map.STUDY_BASE_DIR)
    assert PretrainRecipe.from_dict(record["recipe"]) == STUDY_BASE and record["recipe_hash"] == recipe_hash(
        STUDY_BASE
    )
    pipeline = stability_map.study_pipeline()
    stored = load_file(stability_map.STUDY_BASE_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = pipeline.unet.state_dict()
    assert set(stored) == set(loaded) and all(torch.equal(stored[k], loaded[k]) for k in stored)


def test_a_stored_file_that_changed_or_another_recipe_is_refused_by_name(tmp_path):
    import json
    import shutil

    from benchmarks.studies.stability_map import STUDY_BASE_DIR, study_base_problem

    folder = tmp_path / "study_base"
    shutil.copytree(STUDY_BASE_DIR, folder)
    assert study_base_problem(folder) is None
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert "vae/diffusion_pytorch_model.safetensors" in study_base_problem(folder)
    shutil.copy(STUDY_BASE_DIR / "vae" / "diffusion_pytorch_model.safetensors", weights)
    record = json.loads((folder / "demo_recipe.json").read_text())
    (folder / "demo_recipe.json").write_text(json.dumps({**record, "recipe_hash": recipe_hash(PretrainRecipe())}))
    assert recipe_hash(PretrainRecipe()) in study_base_problem(folder)
    (folder / "demo_recipe.json").unlink()
    assert "no stored base" in study_base_problem(folder)


def test_the_stored_base_stays_out_of_the_wheel():
    """The wheel holds the package's own folders only: the stored base lies beside ``benchmarks/``, in no package
    and in no package-data pattern."""
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert all(package.split(".")[0] == "trl_diffusion_sdpo" for package in dist.packages)
    shipped = {
        path.resolve()
        for package, patterns in dist.package_data.items()
        for pattern in patterns
        for path in (ROOT / package.replace(".", "/")).glob(pattern)
    }
    stored = {path.resolve() for path in (ROOT / "benchmarks" / "study_base").rglob("*") if path.is_file()}
    assert stored and not shipped & stored


RERUN = "benchmarks/results/safeguard-comparison/cpu-rerun-cell-seed4-lr2e-4-step50.json"


def test_the_docs_state_the_recorded_cell_and_its_rerun_as_their_files_say():
    """docs/demo.md's benchmark's-base section quotes the recorded cell from its result file and the rerun from
    ``rerun_cell.py``'s, and names how to rerun it; the README says where the base lives."""
    import json

    from benchmarks.tools import rerun_cell

    section = (ROOT / "docs/demo.md").read_text().split("### The benchmark's base", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())
    record = json.loads((ROOT / rerun_cell.RECORD).read_text())
    rerun = json.loads((ROOT / RERUN).read_text())
    assert rerun["record"] == rerun_cell.RECORD and rerun["reproduced"] and rerun["differences"] == []
    assert (
        rerun["base"]["pairs"]["rerun"] == record["base"]["pairs"]
        and f"its {record['base']['pairs']} pairs" in section
    )
    for key, run in rerun["runs"].items():
        recorded = record["runs"][run["run"]]["reward_change"][str(rerun["cell"]["step"])]
        assert run["reward_change"]["recorded"] == recorded, key
        assert f"{recorded:+.3f}" in section, key
        assert f"{run['reward_change']['rerun']:+.6f} against the recorded {recorded:+.6f}" in section or (
            f"{run['reward_change']['rerun']:+.6f} against {recorded:+.6f}" in section
        ), key
    assert RERUN in section and rerun_cell.RECORD in section and "python benchmarks/tools/rerun_cell.py" in section
    assert "`benchmarks/study_base/`" in section and "`benchmarks/study_base/`" in (ROOT / "README.md").read_text()


PRETRAINED = "benchmarks/results/safeguard-comparison/cpu-rerun-cell-seed4-lr2e-4-step50-pretrained-base.json"


def test_the_docs_state_what_pretraining_the_base_again_gave_as_its_file_says():
    import json

    section = (ROOT / "docs/demo.md").read_text().split("### The benchmark's base", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())
    found = json.loads((ROOT / PRETRAINED).read_text())
    assert found["base_source"] in ("pretrained", "cache") and not found["reproduced"] and PRETRAINED in section
    distances = found["pretrained_against_stored"]
    for name, label in (("unet", "UNet"), ("vae", "VAE"), ("text_encoder", "text encoder")):
        assert f"{distances[name]['relative_l2']:.1e} ({label})" in section, name
    base = found["base"]
    assert f"{base['reward']['rerun']:.4f} against {base['reward']['recorded']:.4f}" in section
    assert f"{base['pairs']['rerun']} pairs against {base['pairs']['recorded']}" in section
    dpo, mu = found["runs"]["dpo"]["reward_change"], found["runs"]["sdpo-output-mu0.5"]["reward_change"]
    assert (
        f"{dpo['rerun']:+.3f} and {mu['rerun']:+.3f} against the recorded {dpo['recorded']:+.3f} and "
        f"{mu['recorded']:+.3f}" in section
    )
