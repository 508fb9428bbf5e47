"""What caching latents and text embeddings saves on the flow families (SD3, FLUX), where T5 dominates encoding.

Three measurements, side by side in one run:

1. Per encoder, the time to encode one batch of prompts (and the VAE one batch of pairs) on the tiny pipelines, so
   the share of each encoder in what the cache removes from every step is measured, not assumed.
2. Training steps with ``cache_latents=False`` and ``True`` on the same tiny pipeline, data and seed: the median
   step time of each and their ratio, and the one-off time to build the cache.
3. At real size (SD3.5 / FLUX.1 text encoders built from their configs on the meta device: nothing is allocated or
   downloaded), each encoder's parameter count and its forward cost per prompt, ``2 * parameters * tokens``
   multiply-adds counted as FLOPs (the embedding tables excluded: a lookup costs no multiply-adds).

    python benchmarks/speed/flow_text_cache.py --output benchmarks/results/flow-families/cpu-flow-text-cache-tiny.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.families import family_for_pipeline  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline  # noqa: E402

BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}

# Real-size text encoders (the published configs' shapes: CLIP ViT-L/14 and OpenCLIP bigG/14 text towers, T5 v1.1 XXL
# encoder) and the token counts each family feeds them.
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu"
)


def _dataset(n: int):
    from datasets import Dataset
    from PIL import Image

    def png(colour) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = [
        {
            "caption": f"a picture of a red square and a blue circle, number {i}",
            "jpg_0": png((20 * i % 255, 40, 200)),
            "jpg_1": png((200, 20 * i % 255, 40)),
            "label_0": float(i % 2),
        }
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_times(kind: str, batch: int, max_length: int, repeats: int) -> dict[str, float]:
    """Median seconds per batch for each text encoder and for the VAE on ``batch`` pairs at 32 px."""
    pipe = BUILDERS[kind](seed=0, tokenizer_dir=tempfile.mkdtemp(), max_length=max_length)
    family = family_for_pipeline(pipe, max_sequence_length=max_length)
    tokens = family.prompt_tokenizer()([f"a red square number {i}" for i in range(batch)])
    out: dict[str, float] = {}
    with torch.no_grad():
        for key, name in (
            ("input_ids", "text_encoder"),
            ("input_ids_2", "text_encoder_2"),
            ("input_ids_3", "text_encoder_3"),
        ):
            if key in tokens:
                encoder = getattr(pipe, name)
                out[f"{name} ({type(encoder).__name__})"] = _time(
                    lambda encoder=encoder, ids=tokens[key]: encoder(ids), repeats
                )
        pixels = torch.rand((2 * batch, 3, 32, 32)) * 2 - 1
        out["vae encode (2 images per pair)"] = _time(lambda: family.encode_moments(pixels), repeats)
    return out


def step_times(kind: str, steps: int, batch: int, max_length: int) -> dict[str, float]:
    """Median training-step seconds without and with the cache (LoRA, Diffusion-DPO, output-space safeguard)."""
    from peft import LoraConfig

    result: dict[str, float] = {}
    dataset = _dataset(batch * (steps + 2))
    for cache in (False, True):
        pipe = BUILDERS[kind](seed=0, tokenizer_dir=tempfile.mkdtemp(), max_length=max_length)
        with tempfile.TemporaryDirectory() as tmp:
            args = DiffusionSDPOConfig(
                output_dir=tmp,
                resolution=32,
                per_device_train_batch_size=batch,
                max_steps=steps + 2,
                learning_rate=1e-4,
                scale_lr=False,
                warmup_steps=0,
                logging_steps=1000,
                use_cpu=True,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                beta=100.0,
                cache_latents=cache,
                latent_cache_dir=f"{tmp}/cache",
                max_sequence_length=max_length,
                random_flip=False,
            )
            built = time.perf_counter()
            trainer = DiffusionSDPOTrainer(
                pipe,
                args=args,
                train_dataset=dataset,
                peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
            )
            if cache:
                result["cache_build_s (trainer construction incl. encoding)"] = time.perf_counter() - built
            marks: list[float] = []

            from transformers import TrainerCallback

            class Clock(TrainerCallback):
                def __init__(self, marks: list[float]) -> None:
                    self.marks = marks

                def on_step_end(self, *a, **k):
                    self.marks.append(time.perf_counter())

            trainer.add_callback(Clock(marks))
            trainer.train()
        per_step = [b - a for a, b in zip(marks[1:], marks[2:])]  # the first two steps are warm-up
        result[f"median_step_s ({'cached' if cache else 'live encoding'})"] = statistics.median(per_step)
    result["cached / live step time"] = result["median_step_s (cached)"] / result["median_step_s (live encoding)"]
    return result


def real_size_costs() -> dict[str, dict[str, float]]:
    """Parameter counts (meta device) and forward GFLOPs per prompt of the real-size text encoders."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def count(model: torch.nn.Module) -> tuple[int, int]:
        total = sum(p.numel() for p in model.parameters())
        embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        return total, total - embeddings

    rows = {}
    with torch.device("meta"):
        encoders = {
            "CLIP-L": (CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)), {"sd3": 77, "flux": 77}),
            "CLIP-G": (CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), {"sd3": 77}),
            "T5-XXL": (T5EncoderModel(T5Config(**T5_XXL)), {"sd3": 77, "sd3_pipeline": 256, "flux": 512}),
        }
    for name, (model, tokens) in encoders.items():
        total, dense = count(model)
        rows[name] = {"parameters": total, "dense_parameters": dense}
        for use, n in tokens.items():
            rows[name][f"gflops_per_prompt_{use}_{n}_tokens"] = 2 * dense * n / 1e9
    sd3 = {k: v for k, v in rows.items()}
    t5_sd3 = sd3["T5-XXL"]["gflops_per_prompt_sd3_77_tokens"]
    clip_sd3 = sd3["CLIP-L"]["gflops_per_prompt_sd3_77_tokens"] + sd3["CLIP-G"]["gflops_per_prompt_sd3_77_tokens"]
    t5_flux = sd3["T5-XXL"]["gflops_per_prompt_flux_512_tokens"]
    clip_flux = sd3["CLIP-L"]["gflops_per_prompt_flux_77_tokens"]
    rows["t5_share_of_text_flops"] = {
        "sd3 (77 T5 tokens)": t5_sd3 / (t5_sd3 + clip_sd3),
        "flux (512 T5 tokens)": t5_flux / (t5_flux + clip_flux),
    }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64, help="Prompt tokens of every tiny encoder.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "machine": "cpu", "real_size": real_size_costs()}
    for kind in ("sd3", "flux"):
        report[kind] = {
            "encode_s_per_batch": encoder_times(kind, args.batch, args.max_length, args.repeats),
            "training": step_times(kind, args.steps, args.batch, args.max_length),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
