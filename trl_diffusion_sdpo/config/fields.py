"""The fields of :class:`DiffusionSDPOConfig`: each field's ``help`` is its documentation (``--help`` and the
class docstring, written from them by :mod:`.docs`); their rules are in :mod:`.rules`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import str_to_bool as strtobool
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from .docs import config_docstring
from .rules import (
    DSPO_FORM_CHOICES,
    INVERSION_NETWORKS,
    NOISING_MODES,
    NONFINITE_ACTIONS,
    PATHOLOGY_ACTIONS,
    SAFEGUARD_PASSES,
    SAFEGUARD_SCOPES,
    SAFEGUARD_SPACES,
    check_config,
)

__all__ = ["DiffusionSDPOConfig", "option"]


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field whose ``help`` (its documentation: ``--help`` and the class docstring) comes second."""
    return field(default=default, metadata={"help": help, **metadata})


_SUMMARY = r"""
Configuration class for [`DiffusionSDPOTrainer`].

Only the parameters specific to preference tuning of diffusion models are listed here; see
[`~transformers.TrainingArguments`] for the rest. Defaults follow the Diffusion-DPO launchers (Wallace et al., arXiv
2311.12908) and the Diffusion-SDPO paper (Fu et al., arXiv 2511.03317) for SD1.5; `safeguard_mu` follows the model
family (see its entry). Each entry below is the field's `--help` text.
"""


@dataclass
class DiffusionSDPOConfig(TrainingArguments):
    # The docstring is written at import from the fields' helps (config_docstring, below the class).

    # Objective
    beta: float = option(
        5000.0,
        "KL-regularisation strength of Diffusion-DPO. The timestep count and weighting are folded into "
        "it; the paper reports 2000 to 5000 working. Larger values make the logit `u` more sensitive to error "
        "differences. For the flow-matching families (SD3, FLUX) the anchors use much smaller values "
        "(flow_grpo's SD3.5 Flow-DPO: 100 on per-sample mean velocity errors); see docs/sd3.md.",
    )
    loss_type: str = option(
        "dpo",
        "Preference objective (formulas and the authors' settings per model family: "
        "`docs/objectives.md`). `dpo`: Diffusion-DPO, `-logsigmoid(u)`. `dspo`: the score-matching form "
        "(authors' beta 0.001 for SD1.5 with `dspo_form=sd15`, 5000 for SDXL with `dspo_form=sdxl`). `dmpo`: "
        "KL to a Bernoulli target (`dmpo_alpha`; beta 2000 SD1.5, 6000 SDXL). `sft`: supervised fine-tuning on "
        "the winners (no reference, no safeguard). `mapo`: reference-free margin-aware preference optimisation "
        "(`mapo_beta`, `mapo_snr_value`; no reference model is built or run). `smpo`: Diffusion-DPO with "
        "SmPO's smoothed preferences, each pair's logit weighted by `smpo_gamma * (2p - 1)` from two score "
        "columns. `sigmoid`: TRL's name for the Diffusion-DPO loss, read as `dpo`. Or the name of an objective "
        "registered with `register_objective` (its fields are read from the config fields of the same names).",
    )
    dmpo_alpha: float = field(default=0.01, metadata={"help": "DMPO's target `q = 1 - alpha` (authors: 0.01)."})
    dspo_form: str = option(
        "sd15",
        "Which of the authors' DSPO forms: `sd15` (winner residual plus the scaled policy-reference "
        "difference) or `sdxl` (the squared policy-reference difference weighted by `(1 - sigmoid(u))^2`).",
        choices=list(DSPO_FORM_CHOICES),
    )
    mapo_beta: float = field(default=0.1, metadata={"help": "MaPO's odds-ratio weight (the MaPO authors' 0.1)."})
    mapo_snr_value: float = field(
        default=0.5, metadata={"help": "MaPO's `g` of `f(e) = g e / (exp(g e) - 1)` (the MaPO authors' 0.5)."}
    )
    smpo_gamma: float = option(
        10.0, "SmPO's scale (> 0) of the per-pair logit weight `gamma * (2p - 1)`, `p = sigmoid(n_w - n_l)`."
    )
    score_0_column: str = option(
        "score_0",
        "SmPO: score column of the first image (the higher-scored image is the winner); or hand the "
        "trainer a `reward_fn` to score the images itself.",
    )
    score_1_column: str = field(default="score_1", metadata={"help": "SmPO: score column of the second image."})
    smpo_score_min: float = option(
        0.11543526500463486,
        "SmPO: the minimum of the score normalisation `n = (s - min) / (max - min)` (SmPO's constant "
        "for PickScore's raw cosine).",
    )
    smpo_score_max: float = option(
        0.28201571106910706,
        "SmPO: the maximum of the score normalisation (SmPO's constant for PickScore's raw cosine).",
    )
    # Safeguard
    safeguard: bool | None = option(
        None,
        "Alias of `safeguard_space` kept for older configs: `False` is `safeguard_space=none` (plain "
        "Diffusion-DPO); `True` keeps `safeguard_space` (refused with `none`). `None`: as `safeguard_space` says. "
        "Once the config is made it reads `True` exactly when a safeguard runs.",
    )
    # None in the annotation only so that transformers' argument parser reads the flag as text ("auto" or a number)
    safeguard_mu: float | str | None = option(
        None,
        "Safeguard margin mu in [0, 1], or `auto`; larger is more conservative. Unset (`None`): the model "
        "family's value where the Diffusion-SDPO authors measured it (arXiv 2511.03317; real-model evidence "
        "outranks the toy's): 0.9 for SD1.5 (family stable-diffusion) with Diffusion-DPO and DMPO, 0.2 with DSPO, "
        "0.6 for SDXL; elsewhere 0.5, the package's pick from its paired comparisons on the CPU demo "
        "(benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo.json, summarised in "
        "trl_diffusion_sdpo/demo/safeguard_recommendation.json): the output space with mu 0.5 paid about as much "
        "as with 0.9 where Diffusion-DPO's pathology bites and cost less where it does not. `auto` holds the "
        "paper's constraint, the winner's error at or below the reference's, by dual ascent on mu from the reduced "
        "`delta/winner` once per optimizer step (`safeguard_mu_step`, docs/safeguard.md), logged as "
        "`safeguard/mu`.",
    )
    safeguard_max_lambda: float = field(default=1.0, metadata={"help": "Upper bound of the safeguard's `lambda`."})
    safeguard_space: str = option(
        "output",
        "The Diffusion-SDPO winner-preserving safeguard: the loser error's gradient is scaled by a detached "
        "`lambda` so that, to first order, the winner's error does not increase; this says where `lambda` is "
        "computed. `none`: no safeguard, plain Diffusion-DPO (`safeguard=False` is its alias). `output`: the "
        "authors' rule on the policy's residuals (two sums, no "
        "extra pass), which treats the UNet's Jacobians on the two branches as equal. `parameter`: the exact "
        "rule, from the gradients of the loss's winner and loser terms over the trainable weights, in the "
        "passes `safeguard_passes` chooses: by default one forward and one backward pass with the branches' "
        "gradients split inside it (one extra gradient-sized buffer; see `docs/safeguard.md` for its "
        "guarantee, cost and the measured difference). Runs on one process, DDP, DeepSpeed ZeRO-1/2, and ZeRO-3 "
        'and FSDP2 with `safeguard_scope="global"`; refused under FSDP1, and ZeRO-3 and FSDP2 with the local scope '
        '(`docs/safeguard.md`, "Where the exact rule runs"). `update`: the same per-branch gradients, with '
        "`lambda` chosen on the optimizer's actual update (AdamW, Adam or SGD: momentum, second moment, weight "
        "decay and clipping included), so the winner's error does not rise to first order under the step "
        "taken; one process, DDP, DeepSpeed ZeRO-1/2/3 or FSDP2, `gradient_accumulation_steps=1`.",
        choices=list(SAFEGUARD_SPACES),
    )
    safeguard_scope: str = option(
        "global",
        "Which samples one `lambda` covers when several processes train. `global` (the default: it runs on every "
        "engine, ZeRO-3 and FSDP2 included): the two sums behind `lambda` are summed over all processes, so every "
        "process uses the `lambda` of the global micro-batch (one extra all-reduce of two numbers per micro-batch); "
        "the run then matches a single process with the same global batch. `local` (the authors' choice): each "
        "process computes `lambda` from its own micro-batch; refused by the exact rule under ZeRO-3 and FSDP2. On "
        "one process the two are the same computation. `pair` (`safeguard_space=parameter`, "
        "`safeguard_passes=one`): one `lambda_i` per preference pair, from that pair's own gradients, so that "
        "pair `i`'s safeguarded gradient does not raise pair `i`'s winner term to first order (with margin "
        "`mu`); not a guarantee for the batch sum, since other pairs' gradients still act on pair `i` "
        "(`docs/safeguard.md`). It keeps one gradient of the trainable weights per image: LoRA, or full tuning "
        "up to 4 GiB of them.",
        choices=list(SAFEGUARD_SCOPES),
    )
    safeguard_passes: str = option(
        "one",
        "How the parameter and update spaces get the branches' gradients. `one`: one forward and one "
        "backward pass over the whole pair batch, as Diffusion-DPO, each weight's gradient split by branch "
        "inside it (per-layer taps); where that cannot run (a trainable weight outside "
        "Linear/ConvNd/norm/embedding layers) the step falls back to `two` and says once why. `two`: one "
        "forward and one backward pass per branch, the reference implementation.",
        choices=list(SAFEGUARD_PASSES),
    )
    safeguard_log_output_lambda: bool = option(
        False,
        "With `safeguard_space` `parameter` or `update`: also compute the authors' output-space `lambda` on the "
        "same micro-batch and log it as `safeguard/output_lambda_*`, for comparison (it is never applied). It "
        'costs a pass over the residuals every micro-batch and, with `safeguard_scope="global"`, one more '
        "all-reduce.",
    )
    # Guards against collapse (docs/safeguard.md, "Guards")
    auto_beta: bool = option(
        False,
        "`loss_type` dpo or smpo: choose `beta` every optimizer step so that a pair at the typical margin has the "
        "gradient factor `auto_beta_target` (SimpleTuner's Flow-DPO rule): `beta = -2 * logit(target) / EMA(|m|)`, "
        "`m` the raw margin `(e_w - e_l) - (e_ref_w - e_ref_l)`, its mean reduced over processes, clamped within a "
        "factor 10 of `beta`. Logged as `beta`.",
    )
    auto_beta_target: float = option(
        0.2,
        "The auto-beta's target gradient factor `sigmoid(-|u|)` at the typical margin, in (0, 0.5) (SimpleTuner's "
        "0.2).",
    )
    max_margin: float | None = option(
        None,
        "`loss_type` dpo or smpo: cap the logit `u` at this value before the log-sigmoid (`u.clamp(max=...)`), so "
        "pairs already won by more stop pushing (zero gradient). Logged: `guard/capped_fraction`. `None`: no cap.",
    )
    sft_weight: float = option(
        0.0,
        "`loss_type` dpo or smpo: add `sft_weight * mean(e_w)`, the winner's plain denoising error, to the loss "
        "(an SFT anchor on the preferred images). Logged: `guard/sft_loss`. 0: off.",
    )
    safeguard_mu_step: float = option(
        1.0,
        "`safeguard_mu=auto`: the dual-ascent step `eta` of `mu <- clamp(mu + eta * c, 0, 1)`, with `c` the "
        "step's relative violation `sum(e_w - e_ref_w) / sum(e_ref_w)` over every process's pairs (a winner error "
        "one percent above the reference's raises mu by 0.01 per step at 1.0). Not tuned: not measured.",
    )
    ema_decay: float | None = option(
        None,
        "Keep an exponential moving average of the trained weights with this decay (diffusers' `EMAModel`, "
        "updated after every optimizer step), save it beside them under `ema/` in each checkpoint and the output "
        "folder, and sample the validation grids from it. `None`: off. 0.999 to 0.9999 are usual.",
    )
    on_pathology: str = option(
        "warn",
        "What to do when `health/winner_pathology` fires (the winner's error held above the reference's while the "
        "implicit accuracy stays low, the pattern of the runs whose held-out reward fell; the rule and its "
        "calibration: docs/research/alarm.md). `warn`: a warning naming remedies not already on. "
        "`escalate`: raise `safeguard_mu` halfway to 1 each time it fires (logged as `safeguard/mu` and "
        "`health/escalations`; needs the safeguard). `stop`: save a checkpoint and stop, saying why. `safeguard` "
        "(offline, with `safeguard=False`): train as Diffusion-DPO until it fires, then switch to the safeguard "
        "setting that held where Diffusion-DPO's held-out reward fell (docs/safeguard.md), logged as "
        "`health/safeguard_on`.",
        choices=list(PATHOLOGY_ACTIONS),
    )
    # Data
    resolution: int = option(
        512,
        "Training resolution: images are resized so their shorter side is this, then cropped to a "
        "square (a multiple of 8).",
    )
    source_resolution: int | None = option(
        None,
        "Editing: the side of the square each source image is encoded at (a multiple of the family's "
        "latent patch: 16 for FLUX.1 Kontext and Qwen-Image-Edit). None: the training resolution, as the data "
        "crops it. FluxKontextPipeline and QwenImageEditPipeline encode their input image at about 1024x1024 by "
        "default; training warns at start where the sizes differ. Not with cache_latents.",
    )
    random_crop: bool = option(
        False,
        "Random instead of center crop. Winner and loser share the crop position (relative to their "
        "size). The offsets come from the trainer's keyed draws (like the flips), so a resumed run crops as the "
        "uninterrupted one.",
    )
    random_flip: bool = option(
        True,
        "Flip horizontally with probability 0.5: both images of a pair together (MaPO's choice, and ours "
        "by default), or each image on its own with `independent_augmentation`.",
    )
    independent_augmentation: bool = option(
        False,
        "Flip (and, with `random_crop`, crop) each image of a pair independently, as the Diffusion-SDPO "
        "authors do, instead of the pair together.",
    )
    num_frames: int | None = option(
        None,
        "Video families (Wan): frames per clip, read from each video of a pair at `frame_stride` from its "
        "first frame and resized and cropped like an image, the same way for both videos. Wan needs `4k + 1` "
        "(81 as it samples; 17 or 33 to save memory). `None`: the data are images.",
    )
    frame_stride: int = option(
        1, "Video families: keep every `frame_stride`-th frame (2 halves the frame rate of the clip the model sees)."
    )
    fixed_time_ids: bool = option(
        False,
        "SDXL only: condition every image on `time_ids = (res, res, 0, 0, res, res)` as the "
        "Diffusion-SDPO authors do, instead of its real original size and crop (the default, as SDXL was "
        "trained).",
    )
    proportion_empty_prompts: float = option(
        0.2, "Fraction of prompts replaced by the empty prompt during training (classifier-free guidance dropout)."
    )
    min_timestep: int = field(default=0, metadata={"help": "Smallest training timestep (inclusive)."})
    max_timestep: int | None = option(
        None,
        "Largest training timestep (exclusive); `None` means the scheduler's `num_train_timesteps`. UNet "
        "families only; the flow families draw noise levels with the `flow_*` settings.",
    )
    noising: str | None = option(
        None,
        "How the noised input is made: `forward` (`x_t` from fresh noise, the target that noise) or "
        "`inversion` (SmPO's ReNoise inversion: `x_t` from inverting the clean latents with the network, no "
        "gradient, and the target the noise that `x_t` implies; DDIM inversion for the UNet families, Euler "
        "inversion of the velocity for the flow families; see `docs/objectives.md`). `None`: `inversion` for "
        "`loss_type=smpo` (the paper's method), `forward` otherwise. Any objective can use either.",
        choices=list(NOISING_MODES),
    )
    inversion_steps: int | None = option(
        None,
        "Length of the inversion grid; `None`: the family's default (SmPO: 5 for SD 1.x/2.x, 10 for "
        "SDXL; 10 for the flow families, this package's choice). A pair takes the grid points below its "
        "timestep, so the cost per pair is up to `inversion_steps * inversion_renoise` no-grad forward passes.",
    )
    inversion_renoise: int = option(
        2, "Network evaluations per inversion step, averaged (ReNoise; SmPO: 2; 1 is plain DDIM inversion)."
    )
    inversion_network: str = option(
        "policy",
        "Which network inverts: `policy` (the model being trained, as SmPO's code does) or `reference`.",
        choices=list(INVERSION_NETWORKS),
    )
    flow_weighting_scheme: str | None = option(
        None,
        "How the noise level `s` is drawn and weighted (diffusers' "
        "`compute_density_for_timestep_sampling` and `compute_loss_weighting_for_sd3`): `logit_normal`, "
        "`mode`, `none` (uniform), `sigma_sqrt` or `cosmap` (uniform draws, weighted losses). `None`: the "
        "family's default (`logit_normal` for SD3 and FLUX).",
    )
    flow_logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal density."})
    flow_logit_std: float = field(default=1.0, metadata={"help": "Standard deviation of the logit-normal density."})
    flow_mode_scale: float = field(default=1.29, metadata={"help": "Scale of the mode density."})
    flow_shift: str | None = option(
        None,
        "`scheduler`: levels from the training scheduler's sigma table (its static shift, 3.0 for SD3), "
        "as diffusers' scripts; `resolution`: FLUX's resolution-dependent shift on the unshifted table; `none`: "
        "unshifted. `None`: the family's default (SD3 `scheduler`, FLUX `resolution`).",
    )
    max_sequence_length: int | None = option(
        None,
        "Prompt tokens of a flow family's text encoder (T5 for SD3 and FLUX.1, UMT5 for Wan, the language "
        "model for Qwen-Image and its edit and 2.1 variants, Z-Image, FLUX.2 and HunyuanVideo 1.5); `None`: the "
        "family's default (SD3 77 as diffusers' SD3 LoRA script, the others 512).",
    )
    flux_guidance_scale: float | None = option(
        None,
        "The guidance value fed to the guidance embedding of FLUX.1-dev and FLUX.2 [dev] (policy and "
        "reference alike), and of a guidance-distilled Qwen-Image transformer (`guidance_embeds=True`); ignored "
        "by models without one (schnell, FLUX.2 [klein], the released Qwen-Image). `None`: the family's default "
        "(FLUX.1 3.5, as diffusers' FLUX script; FLUX.2 [dev] 4.0, its pipeline's sampling default; Qwen-Image "
        "1.0).",
    )
    caption_column: str = field(
        default="caption", metadata={"help": "Pick-a-Pic caption column, mapped to the prompt column."}
    )
    image_0_column: str = field(default="jpg_0", metadata={"help": "Pick-a-Pic first image column."})
    image_1_column: str = field(default="jpg_1", metadata={"help": "Pick-a-Pic second image column."})
    label_0_column: str = option(
        "label_0",
        "Pick-a-Pic label column: 1 (or `leftvote`) when image 0 is preferred, 0 (`rightvote`) when image 1 "
        "is, 0.5 (`tie`) for a tie. The four Pick-a-Pic columns are mapped to TRL's (the preferred image to "
        "`chosen`), at load with `dataset_columns: pickapic` or by the trainer; ties and bad labels are "
        "skipped and counted.",
    )
    prompt_column: str = field(default="prompt", metadata={"help": "TRL-format prompt column."})
    chosen_column: str = field(default="chosen", metadata={"help": "TRL-format preferred image column."})
    rejected_column: str = field(default="rejected", metadata={"help": "TRL-format rejected image column."})
    source_image_column: str = option(
        "source_image",
        "Editing data (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 with reference images): the column "
        "holding each row's source image; the prompt column then holds the instruction. See docs/editing.md.",
    )
    source_images_column: str = option(
        "source_images", "Editing data: the column holding each row's list of source images (multi-image editing)."
    )
    loss_mask: bool = option(
        False,
        "Train on the region each row's mask marks (`mask_column`: an image of the chosen image's size, white "
        "where the preference lives; for video, one for every frame): the mask is area-interpolated to latent size "
        "and every denoising error "
        "(policy and reference, winner and loser) is its weighted mean, `sum(m * err) / sum(m)`; the safeguard's "
        "lambda is taken on the masked errors. An all-black mask is refused, naming the row. See "
        "docs/masked-loss.md.",
    )
    mask_column: str = option("mask", "The column holding each row's loss mask (`loss_mask=True`).")
    auto_mask: bool = option(
        False,
        "Derive each pair's loss mask from the two images (editing pairs, whose chosen and rejected images copy "
        "the source outside an edited region): white where any channel differs by more than `auto_mask_threshold`, "
        "grown by `mask_dilate` pixels; then trained as `loss_mask`. Both images of a pair must have one size.",
    )
    auto_mask_threshold: float = option(
        0.05,
        "`auto_mask`: the smallest difference between the chosen and the rejected image, in any channel, as a "
        "fraction of the full intensity range (0.05 is about 13 of 255), that marks a pixel (JPEG noise stays "
        "below it).",
    )
    mask_dilate: int = option(
        0,
        "Grow every loss mask (given or derived) by this many pixels at the training resolution (a square max "
        "filter), so the edited region's border, where the VAE's receptive field mixes both sides, is trained too.",
    )
    skip_invalid_rows: bool = option(
        False,
        "By default a bad row (undecodable image, label outside {0, 0.5, 1}, missing value) raises a "
        "`ValueError` naming the row and column before training starts. With `True` such rows are skipped and "
        "counted.",
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to validate the dataset's images before training."}
    )
    cache_latents: bool = option(
        False,
        "Encode every pair with the VAE and every prompt with the text encoder(s) once, before training, "
        "and train from the cached posterior mean and std (sampled afresh each step) and embeddings (see "
        "docs/latent_cache.md). With `random_flip` both the flipped and unflipped pair are cached; prompt "
        "dropout substitutes the cached empty-prompt embedding; `random_crop=True` cannot be cached. The VAE "
        "and text encoders then stay on the CPU during training. Needs a map-style dataset.",
    )
    offload_frozen_modules: bool = option(
        False,
        "Keep the VAE and text encoder(s) in CPU memory and move each layer to the device only while it runs "
        "(diffusers' group offloading, leaf level), for training that encodes images and prompts every step: their "
        "weights then take no device memory, at the cost of copying them for every encoding. Nothing to offload "
        "with `cache_latents` or a latent cache, where they stay on the CPU. See docs/memory.md.",
    )
    latent_cache_dir: str | None = option(
        None,
        "Where the latent cache is stored and looked up; `None` uses a folder beside the dataset's cache "
        "files (or the `datasets` cache for in-memory datasets). A cache is reused whenever model, transforms "
        "and data match.",
    )
    # Robustness
    overwrite_output_dir: bool = option(
        False,
        "Train a new run into an `output_dir` that holds another run's weights or checkpoints, deleting its "
        "checkpoints first. Without it (and without `resume_from_checkpoint`) such a folder is refused before any "
        "file in it is touched.",
    )
    on_nonfinite_loss: str = option(
        "skip",
        "What to do when a micro-batch's loss, or the gradient norm of an optimizer step, is NaN or "
        "infinite. `skip`: its gradients never reach the optimizer (the optimizer step that would include it is "
        "skipped and counted in `nonfinite_skipped`). `raise`: save a checkpoint of the last good state and "
        "stop with an error.",
        choices=list(NONFINITE_ACTIONS),
    )
    preemption_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"],
        metadata={
            "help": "Signals (what SLURM and Kubernetes send before killing a job, and Ctrl-C's SIGINT) on which "
            "training finishes the current optimizer step, writes a checkpoint, logs its path and exits with status "
            "75 (130 after Ctrl-C; a second Ctrl-C stops at once); resuming with `resume_from_checkpoint=True` "
            'continues bit-exactly. Every process stops after the same step. `[]` (or `["none"]`) turns it off. '
            "See `docs/reliability.md`."
        },
    )
    # Evaluation
    eval_seed: int = option(
        0, "Seed of the noise and timesteps used in evaluation, so that two `evaluate()` calls agree."
    )
    validation_prompts: list[str] | None = option(
        None,
        "Prompts sampled while training (off when `None`): at step 0 (the base model) and every "
        "`validation_steps` steps a grid of the policy's samples is saved as PNG under `output_dir/validation/` "
        "and logged to every tracker in `report_to` that takes images (see `docs/evaluation.md`).",
    )
    validation_seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={
            "help": "One validation sample per prompt and seed; the same seeds every time, so grids compare across "
            "steps."
        },
    )
    validation_steps: int = field(default=500, metadata={"help": "Validate every this many optimizer steps."})
    validation_num_inference_steps: int = field(
        default=25, metadata={"help": "Sampling steps of the validation grid."}
    )
    validation_guidance_scale: float | None = option(
        None,
        "Guidance of the validation grid (diffusers' convention). `None`: the family's own guidance, 8.5 "
        "for SD 1.x/2.x and SDXL (the SDPO authors'), else the pipeline's default (3.5 for FLUX.1-dev, as "
        "training conditions on).",
    )
    validation_source_images: list[str] | None = option(
        None,
        "Editing families: one source image file per validation prompt (the prompt is then its "
        "instruction), so the grid shows edits of these images; an editing scorer among `validation_scorers` "
        "is given them. `None`: the editing pipeline samples from the prompt alone.",
    )
    validation_scorers: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Registered scorers (e.g. `pickscore`, `clip`) whose means are logged as `eval/reward/<name>` at "
            "each validation."
        },
    )
    # Learning-rate scaling (authors' recipe)
    scale_lr: bool = option(
        False,
        "The Diffusion-DPO authors' recipe, off by default: with `True`, `learning_rate` is a rate per pair, "
        "multiplied by `processes * per_device_batch * accumulation` (their 1e-8 per pair at 2048 pairs gives "
        "2.048e-5). `False` (TRL's habit): `learning_rate` is the rate.",
    )
    # Changed TrainingArguments defaults
    learning_rate: float = option(
        1e-5,
        "Peak learning rate (a rate per pair when `scale_lr=True`). 1e-5: the rate of the shipped SD1.5 and SDXL "
        "LoRA configs (docs/usage.md: 1e-5 to 1e-4 for LoRA), half the authors' SD1.5 full-tuning rate (1e-8 per "
        "pair x 2048 pairs = 2.048e-5). The flow families' LoRA configs use 1e-4.",
    )
    lr_scheduler_type: SchedulerType | str = option(
        "constant_with_warmup", "Scheduler type (the authors': constant after a linear warmup)."
    )
    warmup_steps: float = field(default=500, metadata={"help": "Linear warmup steps (the authors' 500)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (the authors' 1.0)."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay (the Diffusion-SDPO authors' 0.01)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay `False`: the collator reads the image columns."}
    )
    logging_nan_inf_filter: bool = option(
        False,
        "transformers' per-step NaN check of the logged loss, which makes the host wait for the device "
        "every step; the trainer already keeps non-finite micro-batch losses out of the logged loss on the "
        "device.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.safeguard_mu, str) and self.safeguard_mu != "auto":  # a number given on the command line
            self.safeguard_mu = _number_or_text(self.safeguard_mu)
        self._resolve_aliases()
        # Each field's rule, the rules over several fields, and the checks the objectives, the flow families and the
        # checkpointing registered (rules.check_config); the trainer runs them again when it is built.
        check_config(self)
        if _launched_on_cpu_only():
            # Several processes, no GPU: without these, accelerate finds no device backend and runs each process as a
            # lone one (no gradient sync), and under DeepSpeed disagrees with it on the number of processes.
            if self.ddp_backend is None:
                self.ddp_backend = "gloo"
            if not self.deepspeed and not strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
                self.use_cpu = True
        super().__post_init__()

    def _resolve_aliases(self) -> None:
        """TRL's and the older names onto the fields that hold them: ``loss_type="sigmoid"`` (TRL's name of the
        Diffusion-DPO loss) is ``"dpo"``; ``safeguard=False`` is ``safeguard_space="none"``. ``safeguard`` then
        says whether a safeguard runs, for the code and the configs that read it."""
        if self.loss_type == "sigmoid":
            self.loss_type = "dpo"
        if self.safeguard is False:
            self.safeguard_space = "none"
        elif self.safeguard is True and self.safeguard_space == "none":
            raise ValueError(
                "safeguard=True asks for a safeguard but safeguard_space='none' turns it off: set safeguard_space "
                "to 'output', 'parameter' or 'update' (and drop safeguard, the older name), or set "
                "safeguard_space='none' alone for Diffusion-DPO."
            )
        self.safeguard = self.safeguard_space != "none"

    @property
    def inverts(self) -> bool:
        """Whether the noised input comes from ReNoise inversion: ``noising="inversion"``, or ``noising=None`` with
        ``loss_type="smpo"``."""
        return self.noising == "inversion" or (self.noising is None and self.loss_type == "smpo")


DiffusionSDPOConfig.__doc__ = config_docstring(DiffusionSDPOConfig, _SUMMARY)


def _number_or_text(value: str) -> float | str:
    """``value`` as a float where it reads as one, else unchanged (the field's rule then names it)."""
    try:
        return float(value)
    except ValueError:
        return value


def _launched_on_cpu_only() -> bool:
    """Several processes were launched (torchrun / accelerate launch) and there is no CUDA device."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
