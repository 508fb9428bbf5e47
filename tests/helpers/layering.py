"""The package's modules and their import names."""

from __future__ import annotations

from pathlib import Path

PACKAGE = "trl_diffusion_sdpo"

ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def module_name(path: Path, package_root: Path | None = None) -> str:
    """The import name of ``path``, a file of the package at ``package_root`` (default: this checkout's)."""
    parts = path.relative_to((package_root or ROOT).parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
