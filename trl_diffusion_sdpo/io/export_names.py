"""What ``export`` writes, by name, importing nothing: the formats and the weights' dtypes its options offer (the
command's parser reads them before torch loads; :mod:`.export` writes them)."""

from __future__ import annotations

__all__ = ["EXPORT_DTYPE_NAMES", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("kohya", "comfyui", "diffusers")
# torch's names of the dtypes an exported LoRA or a merged pipeline is cast to
EXPORT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
