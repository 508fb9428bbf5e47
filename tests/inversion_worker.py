"""One process of a two-process SmPO training with ReNoise inversion (``tests/families/test_inversion.py``): records,
per step, this process's timesteps and how often its inversion called the network, into ``<result>.<rank>.json``.

    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes 2 \
        tests/inversion_worker.py <result> <safeguard_space>
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers

from datasets import Dataset  # noqa: E402

from tests.helpers.common import pickapic_rows  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.families.inversion import DDIMInversionNoiser  # noqa: E402
from trl_diffusion_sdpo.testing.unet import build_tiny_sd_pipeline  # noqa: E402


def main(result: str, space: str, launch_fields: dict) -> None:
    calls: list[tuple[list[int], int]] = []
    invert = DDIMInversionNoiser.invert

    def counting_invert(self, noised, predict, max_level=None):
        count = [0]

        def counted(sample, timestep, rows):
            count[0] += 1
            return predict(sample, timestep, rows)

        out = invert(self, noised, counted, max_level)
        calls.append((noised.timesteps.tolist(), count[0]))
        return out

    DDIMInversionNoiser.invert = counting_invert
    rows = pickapic_rows(8)
    for i, row in enumerate(rows):
        row["score_0"], row["score_1"] = 0.2 + 0.01 * i, 0.15
    args = DiffusionSDPOConfig(
        output_dir=tempfile.mkdtemp(),
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        loss_type="smpo",
        smpo_score_min=0.1,
        smpo_score_max=0.3,
        safeguard_space=space,
        **launch_fields,
    )
    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=tempfile.mkdtemp())
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    Path(f"{result}.{trainer.accelerator.process_index}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
