"""Where the preference loss trains on an editing pair set: the whole image, or the region the images differ in.

Pairs come from the demo's shapes (``trl_diffusion_sdpo.demo.shapes``, 32 px): a shape on its background with a
mark in one corner (8 x 8 px, 1/16 of the image, aligned to the shipped demo base's 4-pixel latent grid). The chosen
and rejected images are the same picture with the mark in two colours; the mask marks the mark. The shipped demo base
(``trl_diffusion_sdpo/demo/base``) is tuned with LoRA, once with the loss over the whole image and once with
``loss_mask=True``, from one seed, the same pairs, noise and timesteps.

Measured, on fixed evaluation draws (noise and timesteps keyed apart from training's, the same for both runs):

* ``outside_share_of_preference_signal``: at the start (policy = reference), the share of
  ``sum |r_w^2 - r_l^2|`` (the per-position difference of the winner's and loser's squared errors, which makes
  ``e_w - e_l``) that lies outside the edited region's latent positions: the part of the whole-image loss's signal
  that comes from pixels both images share.
* at the start, ``weight_gradient_from_outside`` / ``_inside``: the run's loss gradient with respect to the
  predictions split into the region's latent positions and the rest, each part backpropagated to the LoRA weights
  alone; the norm of each part over the norm of the whole gradient (what drives the first update).
* after training, ``prediction_change_inside`` / ``_outside``: the mean ``|policy - reference|`` prediction per latent
  element inside and outside the region, and their ratio (per unit area: where training moved the model).
* ``region_accuracy``: the fraction of (pair, draw) whose Diffusion-DPO logit on the region's masked errors is
  positive (the policy prefers the chosen mark more than the reference does), and ``region_margin`` its mean.

    python benchmarks/studies/masked_loss.py --output benchmarks/results/objectives/cpu-masked-loss-demo-edits.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.studies.stability_map import load_study_base  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.demo.shapes import COLOURS, all_captions, draw_shape  # noqa: E402

SIZE = 32
MARK = 8  # pixels; the shipped base's VAE halves twice: a 2 x 2 block of latent positions
EVAL_STEP = 100_000  # evaluation draws are keyed by steps training never reaches


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def editing_pairs(n: int, seed: int = 0):
    """``n`` rows: prompt, chosen, rejected (one picture, the corner mark in two colours) and the mark's mask."""
    from datasets import Dataset
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    captions = all_captions()
    colours = list(COLOURS)
    rows = []
    for _ in range(n):
        caption = rng.choice(captions)
        picture = draw_shape(caption, SIZE, rng)
        top, left = rng.choice([(0, 0), (0, SIZE - MARK), (SIZE - MARK, 0), (SIZE - MARK, SIZE - MARK)])
        wanted, other = rng.sample([c for c in colours if c != caption.colour], 2)
        box = (left, top, left + MARK - 1, top + MARK - 1)
        chosen, rejected = picture.copy(), picture.copy()
        ImageDraw.Draw(chosen).rectangle(box, fill=COLOURS[wanted])
        ImageDraw.Draw(rejected).rectangle(box, fill=COLOURS[other])
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        prompt = f"{caption.text} with a {wanted} mark"
        rows.append({"prompt": prompt, "chosen": _png(chosen), "rejected": _png(rejected), "mask": _png(mask)})
    return Dataset.from_list(rows)


def _trainer(base, dataset, masked: bool, steps: int, workdir: str) -> DiffusionSDPOTrainer:
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    components = {**base.components, "unet": copy.deepcopy(base.unet), "scheduler": copy.deepcopy(base.scheduler)}
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    args = DiffusionSDPOConfig(
        output_dir=workdir,
        loss_mask=masked,
        resolution=SIZE,
        beta=5000.0,
        learning_rate=2e-4,
        scale_lr=False,
        warmup_steps=0,
        per_device_train_batch_size=4,
        max_steps=steps,
        random_flip=False,
        proportion_empty_prompts=0.0,
        logging_steps=steps,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    return DiffusionSDPOTrainer(pipeline, args=args, train_dataset=dataset, peft_config=lora)


def weight_gradient_parts(trainer: DiffusionSDPOTrainer, collate, rows: list[dict]) -> dict:
    """At the current weights, the LoRA gradient of the run's own loss driven by the predictions inside the region
    and by those outside, summed over every pair (one keyed draw), as norms relative to the whole gradient."""
    from trl_diffusion_sdpo.step.predictions import evaluate_objective

    model = trainer.model
    weights = [p for p in model.parameters() if p.requires_grad]
    parts = {"inside": 0.0, "outside": 0.0}
    for start in range(0, len(rows), 4):
        batch = trainer._prepare_inputs(collate(rows[start : start + 4]))
        noised = trainer.stages.noised_pair(model, batch, "train", EVAL_STEP - 1)
        if not trainer.args.loss_mask:  # the whole-image run: its loss over the whole image
            noised.loss_mask = None
        with torch.enable_grad():
            predictions = trainer.stages.predict_noised(model, noised, False)
            loss = evaluate_objective(trainer.objective_in_force(), predictions).loss
            branches = (predictions.policy_winner, predictions.policy_loser)
            cotangents = torch.autograd.grad(loss, branches, retain_graph=True)
            region = F.avg_pool2d(batch["loss_mask"][:, 0], SIZE // predictions.target_winner.shape[-1])
            inside = (region > 0).float().expand_as(predictions.target_winner)
            for name, keep in (("inside", inside), ("outside", 1 - inside)):
                grads = torch.autograd.grad(
                    branches, weights, grad_outputs=tuple(c * keep for c in cotangents), retain_graph=True
                )
                flat = torch.cat([g.flatten() for g in grads])
                parts[name] = parts[name] + flat
    whole = (parts["inside"] + parts["outside"]).norm()
    return {
        "weight_gradient_from_inside": float(parts["inside"].norm() / whole),
        "weight_gradient_from_outside": float(parts["outside"].norm() / whole),
    }


def _masked_error(prediction: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``sum(m * (prediction - target)^2) / sum(m)`` per sample, ``m`` the region's area weights broadcast."""
    weights = region.expand_as(prediction)
    return (weights * (prediction - target).pow(2)).flatten(1).sum(1) / weights.flatten(1).sum(1)


@torch.no_grad()
def evaluate(trainer: DiffusionSDPOTrainer, dataset, draws: int, beta: float, gradients: bool = False) -> dict:
    """The measures of the module docstring on ``draws`` keyed noise draws of every pair (in batches of 4); with
    ``gradients``, the split of the weight gradient too."""
    from trl_diffusion_sdpo.data.collators import PreferenceCollator

    collate = trainer.get_train_dataloader().collate_fn
    if not isinstance(collate, PreferenceCollator) or not collate.columns.masked:  # the masks, for the measures
        from trl_diffusion_sdpo.data.columns import PreferenceColumns
        from trl_diffusion_sdpo.data.transforms import PairTransform

        columns = PreferenceColumns("prompt", "chosen", "rejected", mask="mask")
        collate = PreferenceCollator(columns, collate.tokenize, PairTransform(SIZE), train=True)
    model = trainer.model
    model.eval()
    inside_change = outside_change = inside_count = outside_count = 0.0
    outside_signal = total_signal = 0.0
    logits = []
    rows = [dataset[i] for i in range(len(dataset))]
    for draw in range(draws):
        for start in range(0, len(rows), 4):
            batch = trainer._prepare_inputs(collate(rows[start : start + 4]))
            noised = trainer.stages.noised_pair(model, batch, "train", EVAL_STEP + draw)
            predictions = trainer.stages.predict_noised(model, noised, False)
            pairs = predictions.target_winner.shape[0]
            pixel = batch["loss_mask"][:, 0]  # the pair's mask: [B, 1, R, R]
            region = F.avg_pool2d(pixel, SIZE // predictions.target_winner.shape[-1])  # [B, 1, h, w]
            inside = (region > 0).float().expand_as(predictions.target_winner)
            for policy, reference in (
                (predictions.policy_winner, predictions.reference_winner),
                (predictions.policy_loser, predictions.reference_loser),
            ):
                change = (policy - reference).abs()
                inside_change += float((change * inside).sum())
                outside_change += float((change * (1 - inside)).sum())
                inside_count += float(inside.sum())
                outside_count += float((1 - inside).sum())
            r_w = predictions.reference_winner - predictions.target_winner
            r_l = predictions.reference_loser - predictions.target_loser
            signal = (r_w.pow(2) - r_l.pow(2)).abs()
            outside_signal += float((signal * (1 - inside)).sum())
            total_signal += float(signal.sum())

            policy_gap = _masked_error(predictions.policy_winner, predictions.target_winner, region) - _masked_error(
                predictions.policy_loser, predictions.target_loser, region
            )
            reference_gap = _masked_error(
                predictions.reference_winner, predictions.target_winner, region
            ) - _masked_error(predictions.reference_loser, predictions.target_loser, region)
            logits.append(-0.5 * beta * (policy_gap - reference_gap)[:pairs])
    logits = torch.cat(logits)
    split = weight_gradient_parts(trainer, collate, rows) if gradients else {}
    inside_mean, outside_mean = inside_change / inside_count, outside_change / outside_count
    return {
        "prediction_change_inside": inside_mean,
        "prediction_change_outside": outside_mean,
        "inside_to_outside_ratio": inside_mean / outside_mean if outside_mean > 0 else None,
        "outside_share_of_preference_signal": outside_signal / total_signal,
        "region_accuracy": float(((logits > 0).float() + 0.5 * (logits == 0).float()).mean()),
        "region_margin": float(logits.mean()),
        "evaluated_pairs_times_draws": int(logits.numel()),
        **split,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/objectives/cpu-masked-loss-demo-edits.json")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    base, source = load_study_base()
    dataset = editing_pairs(opts.pairs)
    result = {"settings": {**vars(opts), "base": source, "size": SIZE, "mark": MARK}, "machine": "cpu", "runs": {}}
    for name, masked in (("whole_image", False), ("loss_mask", True)):
        with tempfile.TemporaryDirectory() as workdir:
            trainer = _trainer(base, dataset, masked, opts.steps, workdir)
            before = evaluate(trainer, dataset, opts.draws, trainer.args.beta, gradients=True)
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            after = evaluate(trainer, dataset, opts.draws, trainer.args.beta)
            result["runs"][name] = {"before": before, "after": after, "train_seconds": round(seconds, 1)}
            print(name, json.dumps(result["runs"][name], indent=1), flush=True)
    Path(opts.output).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", opts.output)


if __name__ == "__main__":
    main()
