"""What the command-line tests share: the flags of a quick tiny CPU training run, and a folder of pairs to train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# One LoRA step on the tiny base, on the CPU, at 32 px, logging nowhere.
FAST = ["--use_cpu", "--max_steps", "1", "--per_device_train_batch_size", "2", "--resolution", "32", "--report_to"]
FAST += ["none", "--use_peft", "--lora_r", "4"]


def pair_folders(root: Path, n: int = 4, prompt: str | None = "a red circle") -> Path:
    """One folder per pair: chosen.png, rejected.png, prompt.txt (``prompt`` None: none written)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"p{i}"
        folder.mkdir(parents=True)
        for side in ("chosen", "rejected"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{side}.png")
        if prompt is not None:
            (folder / "prompt.txt").write_text(prompt)
    return root
