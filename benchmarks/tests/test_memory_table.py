"""docs/memory.md's fits-on table is what ``benchmarks/tools/memory_table.py`` writes from ``estimate-memory``: a
table edited by hand, or left stale when the estimator changes, fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "tools" / "memory_table.py"


def load_table_module():
    spec = importlib.util.spec_from_file_location("memory_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_table", module)
    spec.loader.exec_module(module)
    return module


table = load_table_module()


def docs_table() -> list[str]:
    text = (ROOT / "docs" / "memory.md").read_text()
    return text.split(table.BEGIN, 1)[1].split(table.END, 1)[0].strip().splitlines()


def test_docs_table_row_equals_the_generator_for_a_transformer_family() -> None:
    generated = table.table_markdown(["Qwen-Image"]).splitlines()
    docs = docs_table()
    assert generated[:2] == docs[:2]  # header
    assert generated[2] in docs, f"docs/memory.md is stale: python {SCRIPT.relative_to(ROOT)} --write docs/memory.md"


@pytest.mark.slow
def test_docs_table_equals_the_generator() -> None:
    assert table.table_markdown().splitlines() == docs_table()
    assert len(docs_table()) == 2 + len(table.FAMILY_CONFIGS)


def test_a_cell_is_the_estimate_memory_verdict_encoding_live_and_from_a_latent_cache() -> None:
    """Qwen-Image's LoRA on a 4-bit base: 30 GiB encoding live (48 GB), 14.3 GiB from a latent cache (24 GB)."""
    live = table.estimate("qwen_image_lora.yaml", "--base_quantization", "quanto-int4", "--cache_latents", "false")
    cached = table.estimate("qwen_image_lora.yaml", "--base_quantization", "quanto-int4", "--cache_latents", "true")
    assert live["total_gib"] > cached["total_gib"]  # the VAE and the text encoder are on the GPU only when live
    expected = (
        f"{live['gpu_gb']:g} GB ({live['total_gib']:.1f} GiB); cached: {cached['gpu_gb']:g} GB "
        f"({cached['total_gib']:.1f} GiB)"
    )
    assert table.cell("qwen_image_lora.yaml", "--base_quantization", "quanto-int4") == expected
    assert expected.startswith("48 GB") and "cached: 24 GB (14.3 GiB)" in expected
