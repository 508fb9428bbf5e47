"""What a plain Diffusion-DPO LoRA run (``safeguard_space="none"``) does not use stays unloaded: the collectives of
several processes (a pipeline given, one process), full tuning's files, the checkpoint save's writer
(``save_strategy="no"``) and the hooks of a frozen module kept in another dtype (float32 throughout) load where they
are used, never at the import of the modules a run loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: loaded only where used: several processes or a path to load, full tuning, a checkpoint save, a module in its own
#: dtype
LOADED_WHEN_USED = (
    "trl_diffusion_sdpo.engines.collectives",
    "trl_diffusion_sdpo.io.full_tuning",
    "trl_diffusion_sdpo.io.checkpoint_writing",
    "trl_diffusion_sdpo.families.own_dtype",
)

RUN = """
    import json, sys
    import trl_diffusion_sdpo.trainer
    imported = sorted(sys.modules)
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=sys.argv[2])
    rows = [
        {"prompt": f"prompt {i}", "chosen": Image.new("RGB", (32, 32), (200, 20 * i, 20)),
         "rejected": Image.new("RGB", (32, 32), (20, 20 * i, 200))}
        for i in range(2)
    ]
    args = DiffusionSDPOConfig(
        output_dir=sys.argv[1], resolution=32, per_device_train_batch_size=2, max_steps=1, use_cpu=True,
        report_to="none", save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, safeguard_space="none",
        warmup_steps=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
    trainer.train()
    trainer.save_model()
    print(json.dumps({"imported": imported, "run": sorted(sys.modules)}))
"""


def test_a_plain_lora_run_loads_none_of_the_modules_loaded_where_used(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUN), str(tmp_path / "out"), str(tmp_path / "tokenizer")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert [m for m in LOADED_WHEN_USED if m in modules["imported"]] == []  # none imported back at a module's top
    assert [m for m in LOADED_WHEN_USED if m in modules["run"]] == []  # nor called by a plain run
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
