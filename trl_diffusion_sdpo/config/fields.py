"""The fields of :class:`DiffusionSDPOConfig`: each field's ``help`` is its documentation (``--help`` and the
class docstring, written from them by :mod:`.docs`); their rules are in :mod:`.rules`."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import str_to_bool as strtobool
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from ._lazy import LazyDocstring, import_target
from .defaults import (
    MACHINE_FIELDS,
    DefaultEntry,
    ResolvedDefault,
    data_loading_defaults,
    data_loading_sentence,
    default_table,
    resolve_default,
    resolve_defaults,
)
from .extras import tracker_problem
from .pathology import SWITCH_REASON, SWITCH_TO, pair_remedies
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
from .trl_habits import loss_type_name

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
    # The docstring is written from the fields' helps when first read (docs.config_docstring, below the class).

    # Objective
    beta: float | None = option(
        None,
        "KL-regularisation strength of Diffusion-DPO. The timestep count and weighting are folded into it. Larger "
        "values make the logit `u` more sensitive to error differences. Unset (`None`): the model family's value "
        "(`trl_diffusion_sdpo.config.defaults`; the start summary prints it with its source): 5000 for the UNet "
        "families (Diffusion-DPO's SD1.5 and SDXL launchers; the paper reports 2000 to 5000 working), 100 for the "
        "flow-matching families (flow_grpo's SD3.5 Flow-DPO value on per-sample mean velocity errors); see "
        "docs/families.md. Read as `trainer.beta`.",
    )
    loss_type: str = option(
        "dpo",
        "Preference objective (formulas and the authors' settings per model family: `docs/objectives.md`). `dpo`: "
        "Diffusion-DPO, `-logsigmoid(u)` (`sigmoid`, TRL's name of the same loss, is read as `dpo`, and TRL's "
        "one-element list form, e.g. `[sigmoid]`, as its element). `dspo`: the score-matching form (authors' beta "
        "0.001 for SD1.5 with `dspo_form=sd15`, 5000 for SDXL with `dspo_form=sdxl`). `dmpo`: KL to a Bernoulli "
        "target (`dmpo_alpha`; beta 2000 SD1.5, 6000 SDXL). `sft`: supervised fine-tuning on the winners (no "
        "reference, no safeguard). `mapo`: reference-free margin-aware preference optimisation (`mapo_beta`, "
        "`mapo_snr_value`; no reference model is built or run). `smpo`: Diffusion-DPO with SmPO's smoothed "
        "preferences, each pair's logit weighted by `smpo_gamma * (2p - 1)` from two score columns. Or the name of an"
        " objective registered with `register_objective` (its fields are read from the config fields of the same "
        "names).",
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
    # None in the annotation only so that transformers' argument parser reads the flag as text ("auto" or a number)
    safeguard_mu: float | str | None = option(
        None,
        "Safeguard margin mu in [0, 1], or `auto`; larger is more conservative. Unset (`None`): the value of the "
        "model family and objective where the Diffusion-SDPO authors measured it (arXiv 2511.03317; real-model "
        "evidence outranks the toy's): 0.9 for SD1.5 (family stable-diffusion) with Diffusion-DPO and DMPO, 0.2 "
        "with DSPO, 0.6 for SDXL; elsewhere, and on the shipped tiny base, 0.5, the package's pick from its paired "
        'comparisons on the CPU demo (docs/safeguard.md, "Which setting"): the output space with mu 0.5 paid '
        "about as much as with 0.9 where Diffusion-DPO's pathology bites and cost less where it does not. The "
        "table of these defaults is `trl_diffusion_sdpo.config.defaults`. `auto` holds the paper's constraint, "
        "the winner's error at or below the reference's, by dual ascent on mu from the reduced `delta/winner` once "
        "per optimizer step (`safeguard_mu_step`, docs/safeguard.md), logged as `safeguard/mu`.",
    )
    safeguard_max_lambda: float = field(default=1.0, metadata={"help": "Upper bound of the safeguard's `lambda`."})
    # None in the annotation only for transformers' parser: the config resolves it when made (config.defaults)
    safeguard_space: str | None = option(
        None,
        "The Diffusion-SDPO winner-preserving safeguard: the loser error's gradient is scaled by a detached "
        "`lambda` so that, to first order, the winner's error does not increase; this says where `lambda` is "
        "computed. Unset (`None`): `output` offline; online `none` unless a `safeguard_mu` or "
        "`on_pathology='escalate'` asks for a safeguard, then `output` (docs/online.md). `none`: no safeguard, "
        "plain Diffusion-DPO. `output`: the authors' rule on the policy's residuals (two sums, no "
        "extra pass), which treats the UNet's Jacobians on the two branches as equal. `parameter`: the exact "
        "rule, from the gradients of the loss's winner and loser terms over the trainable weights, in the "
        "passes `safeguard_passes` chooses: by default one forward and one backward pass with the branches' "
        "gradients split inside it (two gradient-sized rows in the dtype their products have, freed as the "
        "combination reads them; see "
        "`docs/safeguard.md` for its guarantee, cost and the measured difference). Runs on one process, DDP, "
        "DeepSpeed ZeRO-1/2, and ZeRO-3 "
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
        "calibration: docs/safeguard.md). `warn`: a warning naming remedies not already on. "
        "`escalate`: raise `safeguard_mu` halfway to 1 each time it fires (logged as `safeguard/mu` and "
        "`health/escalations`; needs the safeguard). `stop`: save a checkpoint and stop, saying why. `safeguard` "
        "(offline, with `safeguard_space='none'`): train as Diffusion-DPO until it fires, then switch to the "
        "safeguard setting that held where Diffusion-DPO's held-out reward fell (docs/safeguard.md), logged as "
        "`health/safeguard_on`. `rewind` (with `probe_steps`): when the held-out probe's alarm fires "
        "(`probe_alarm_rise`, `probe_alarm_z`), put the "
        "trainable weights, the optimizer state, the EMA weights, the auto-beta, an automatic `safeguard_mu` and the "
        "fp16 gradient scaler back to the last probe that could not tell the winner error's rise from zero (else the "
        "start), logged as `health/rewind_to` (the "
        "learning-rate schedule goes on counting steps); then the run trains on at a learning rate lowered by "
        "`rewind_lr_factor`, an offline Diffusion-DPO run (`safeguard_space='none'`) with the safeguard `safeguard` "
        "switches to, until `rewind_max_times` rewinds have trained on: the alarm firing after that stops the run "
        "with the healthy weights (docs/safeguard.md). With `probe_steps`, every value acts on the probe's alarm too "
        "(`warn`: a "
        "warning naming the step a rewind would restore, once per unhealthy episode).",
        choices=list(PATHOLOGY_ACTIONS),
    )
    probe_steps: int | None = option(
        None,
        "Every this many optimizer steps, evaluate the policy and the reference on a fixed set of held-out pairs at "
        "fixed noise and timesteps (their own draws: the training is unchanged), logged as `probe/delta_winner`, "
        "`probe/delta_loser`, `probe/implicit_acc` and the errors (docs/safeguard.md). Online the pairs are made "
        "once, before training: each held-out prompt sampled `num_generations` times by the initial policy with the "
        "run's sampler and reward, at the probe's own seeds, best against worst (docs/online.md). `None`: off, since "
        "without an eval_dataset it takes `probe_pairs` pairs (online: prompts) out of the training data.",
    )
    probe_pairs: int = option(
        4,
        "The probe's pairs: the first this many of the eval_dataset, or, without one, this many pairs held back from "
        "the training data (drawn at random with `probe_pairs_seed`, stratified by prompt where prompts repeat; the "
        "first rows of a stream), as the start summary says; online, the pairs of this many prompts, the training "
        "prompts' last (a stream's first), of which a prompt whose samples score alike gives none. Shared out over "
        "the processes.",
    )
    probe_pairs_seed: int | None = option(
        None,
        "The seed that draws the probe's pairs held back from the training data (offline, without an eval_dataset; "
        "each prompt contributes in proportion to its rows). `None`: the run's `seed`.",
    )
    probe_noise_draws: int = option(
        8,
        "The held-out probe noises each of its pairs this many times (noise and timestep draws of its own), so its "
        "figures are means over `probe_pairs` x `probe_noise_draws` readings and `probe/winner_rise_z` has a spread "
        "to measure. Each draw is one more forward of the policy on the probe's pairs at every probe (the "
        "reference's errors on them are kept from the first probe while its weights stay as they are; "
        "docs/safeguard.md states the cost).",
    )
    probe_alarm_rise: float = option(
        0.6,
        "The held-out probe's alarm fires at a probe where the held-out winner error's rise over the reference's is "
        "more than this share of the reference's error (`probe/delta_winner / probe/mse_ref_winner`: no unit, so "
        "the same at any model's scale and any probe size) and the rise is significant (`probe/winner_rise_z` above "
        "`probe_alarm_z`), offline and online alike. Every `on_pathology` reads it when the probe runs "
        "(docs/safeguard.md: the rule and its calibration).",
    )
    probe_alarm_z: float = option(
        1.645,
        "The held-out probe's alarm counts a rise (`probe_alarm_rise`) only where `probe/winner_rise_z`, the rise "
        "over its standard error across the probe's pairs and noise draws, is above this: a rise the probe can tell "
        "from zero, so a few noisy held-back pairs do not fire it.",
    )
    rewind_max_times: int = option(
        2,
        "`on_pathology='rewind'`: how many of its rewinds train on, each with the learning rate lowered by "
        "`rewind_lr_factor` (an offline Diffusion-DPO run also switches the safeguard on at the first); the alarm "
        "firing once more restores the last restore point and stops the run there. 0: stop at the first alarm. "
        "With the default factor the full ladder lowers the rate at least tenfold: the step from the learning rate "
        "at which Diffusion-DPO's held-out reward fell on the stability benchmark (2e-4) to the one at which it held "
        "(2e-5; docs/safeguard.md). What runs end with at the defaults, against the safeguard from step 0 and "
        "Diffusion-DPO at the lowered rate: docs/safeguard.md, the rewind's outcome (tiny CPU runs).",
    )
    rewind_lr_factor: float = option(
        0.3,
        "`on_pathology='rewind'`: each rewind that trains on multiplies the learning rate by this from the next step "
        "(every parameter group's rate and the scheduler's base rates: the schedule goes on at the lower peak), "
        "logged as `health/lr_factor` (the product so far). Chosen with `rewind_max_times` (its help says why); 1 "
        "keeps the rate.",
    )
    rewind_allow_start_weights: bool = option(
        False,
        "`on_pathology='rewind'`: let a run whose ladder ends on the weights it started from (its last rewind went "
        "back to the start, so it trained nothing) exit with status 0 on the command line. Otherwise its last line "
        "says so and the command exits with a status of its own; from Python `train()` returns either way and its "
        "metrics carry `health/ended_at_start` 1.0.",
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
    loss_mask: bool = option(
        False,
        "Train on the region each row's mask marks (the `mask` column: an image of the chosen image's size, white "
        "where the preference lives; for video, one for every frame): the mask is area-interpolated to latent size "
        "and every denoising error "
        "(policy and reference, winner and loser) is its weighted mean, `sum(m * err) / sum(m)`; the safeguard's "
        "lambda is taken on the masked errors. An all-black mask is refused, naming the row. See "
        "docs/masked-loss.md.",
    )
    skip_invalid_rows: bool = option(
        False,
        "By default a bad row (undecodable image, label outside {0, 0.5, 1}, missing value) raises a "
        "`ValueError` naming the row and column before training starts. With `True` such rows are skipped and "
        "counted.",
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
    on_nonfinite_loss: str = option(
        "skip",
        "What to do when a micro-batch's loss, or the gradient norm of an optimizer step, is NaN or "
        "infinite. `skip`: its gradients never reach the optimizer (the optimizer step that would include it is "
        "skipped and counted in `nonfinite_skipped`). `raise`: save a checkpoint of the last good state and "
        "stop with an error.",
        choices=list(NONFINITE_ACTIONS),
    )
    # Learning-rate scaling (authors' recipe)
    scale_lr: bool = option(
        False,
        "The Diffusion-DPO authors' recipe, off by default: with `True`, `learning_rate` is a rate per pair, "
        "multiplied by `processes * per_device_batch * accumulation` (their 1e-8 per pair at 2048 pairs gives "
        "2.048e-5). `False` (TRL's habit): `learning_rate` is the rate.",
    )
    # Changed TrainingArguments defaults
    learning_rate: float | None = option(
        None,
        "Peak learning rate (a rate per pair when `scale_lr=True`, which then needs it given). Unset (`None`): the "
        "model family's rate for LoRA or full tuning (`trl_diffusion_sdpo.config.defaults`; the start summary prints "
        "it with its source): 1e-5 for LoRA on the UNet families (the shipped SD1.5 and SDXL LoRA configs; "
        "docs/usage.md: 1e-5 to 1e-4 for LoRA), the authors' effective rate for their full tuning (SD1.5 2.048e-5, "
        "SDXL 2.048e-6: 1e-8 and 1e-9 per pair x 2048 pairs), each flow family's published LoRA rate "
        "(docs/families.md), and 1e-5 elsewhere.",
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
    dataloader_num_workers: int | None = option(
        None, "Data-loading worker processes (0: load in the training process). " + data_loading_sentence()
    )

    # What a run of this config decides from its own evidence: a subclass whose runs differ (the online config)
    # overrides these methods, and the trainer, the defaults and the alarm ask the config, never its class.
    def defaults_table(self, family: Any = None) -> tuple[DefaultEntry, ...]:
        """The entries an unset field of this run resolves from: the package's and ``family``'s
        (:func:`~trl_diffusion_sdpo.config.defaults.default_table`)."""
        return default_table(family)

    def default_for(
        self, field: str, family: Any = None, base: Any = None, lora: bool = True, objective: str | None = None
    ) -> ResolvedDefault:
        """The value ``field`` takes when unset in this run of ``family`` on ``base``, with LoRA (``lora``) or full
        tuning, for ``objective`` (``None``: this config's ``loss_type``): the most specific entry of
        :meth:`defaults_table` (:func:`~trl_diffusion_sdpo.config.defaults.resolve_default`)."""
        objective = self.loss_type if objective is None else objective
        return resolve_default(field, family, objective, base, lora, self.defaults_table(family))

    def data_loading_defaults(self, *, cuda: bool, cpus: int, processes: int = 1) -> dict[str, Any]:
        """What this run leaves unset of transformers' data loading takes on a machine with a GPU (``cuda``) or not,
        ``cpus`` cores for ``processes`` processes: ``dataloader_num_workers``, ``non_blocking``, and ``run``, the
        kind of run the start summary names with the choice
        (:func:`~trl_diffusion_sdpo.config.defaults.data_loading_defaults`: workers overlap a GPU's step)."""
        return {**data_loading_defaults(cuda=cuda, cpus=cpus, processes=processes), "run": "offline"}

    def pathology_switch(self) -> tuple[dict[str, Any] | None, str]:
        """The fields of the safeguard ``on_pathology="safeguard"`` switches this run to when the alarm fires
        (``None``: none, and the config refuses that action) and why:
        :data:`~trl_diffusion_sdpo.config.pathology.SWITCH_TO`."""
        return dict(SWITCH_TO), SWITCH_REASON

    def pathology_remedies(self) -> list[str]:
        """The remedies the alarm's warning names for this run, those it does not already use:
        :func:`~trl_diffusion_sdpo.config.pathology.pair_remedies`."""
        return pair_remedies(self)

    def __new__(cls, *args: Any, **kwargs: Any) -> DiffusionSDPOConfig:
        # A DPOConfig field with no counterpart here is refused saying what takes its place (the dataclass's own
        # TypeError would name the keyword only)
        unknown = [name for name in kwargs if name not in cls.__dataclass_fields__]
        if unknown:  # the refusals' tables are loaded only for a keyword the config does not take
            import_target(f"{__package__}.trl_refusals:refuse_trl_names")(unknown, cls.__name__)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        # TRL's name of the Diffusion-DPO loss, and TRL 1.x's one-element list, read as the registry's name
        self.loss_type = loss_type_name(self.loss_type)
        if isinstance(self.safeguard_mu, str) and self.safeguard_mu != "auto":  # a number given on the command line
            self.safeguard_mu = _number_or_text(self.safeguard_mu)
        # The safeguard space depends on the config's own table only: resolved now (the rules read it), its source
        # kept for the start summary. learning_rate, beta and safeguard_mu depend on the model family: the trainer
        # resolves them.
        self.defaulted: dict[str, ResolvedDefault] = {}
        if self.safeguard_space is None:
            resolved = resolve_defaults(self)["safeguard_space"]
            self.safeguard_space = resolved.value
            self.defaulted["safeguard_space"] = resolved
        # What depends on the machine or the output is chosen by the command line (config.machine.machine_choices):
        # the config holds transformers' values whatever the machine, and remembers which ones the caller left unset.
        unset = [name for name in MACHINE_FIELDS if getattr(self, name) is None]
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = 0
        # Every rule the config alone can decide: each field's, those over several fields and the chosen
        # objective's own (rules.check_config).
        check_config(self)
        # Before transformers sets up accelerate's processes from the fields below: a launch they cannot join is
        # refused, never repaired (no field's value depends on the machine)
        launch_problem = cpu_launch_problem(self)
        if launch_problem:
            raise ValueError(launch_problem)
        super().__post_init__()
        # transformers' list of trackers is made by its __post_init__; its own error, when the trainer is built,
        # names no extra
        tracker = tracker_problem(self.report_to)
        if tracker is not None:
            raise ValueError(tracker)
        #: the fields of ``MACHINE_FIELDS`` the caller left unset, with the value transformers gave them: the command
        #: line chooses for its copy while a field still holds it
        self.left_unset: dict[str, Any] = {name: copy.copy(getattr(self, name)) for name in unset}

    @property
    def safeguarded(self) -> bool:
        """Whether a safeguard runs (``safeguard_space`` other than ``"none"``)."""
        return self.safeguard_space != "none"

    @property
    def inverts(self) -> bool:
        """Whether the noised input comes from ReNoise inversion: ``noising="inversion"``, or ``noising=None`` with
        ``loss_type="smpo"``."""
        return self.noising == "inversion" or (self.noising is None and self.loss_type == "smpo")


DiffusionSDPOConfig.__doc__ = LazyDocstring(DiffusionSDPOConfig, f"{__package__}.docs:config_docstring", _SUMMARY)


def _number_or_text(value: str) -> float | str:
    """``value`` as a float where it reads as one, else unchanged (the field's rule then names it)."""
    try:
        return float(value)
    except ValueError:
        return value


def cpu_launch_problem(config: Any) -> str | None:
    """What stops several processes launched without CUDA (torchrun / ``accelerate launch``) from training together
    with ``config``, with the fix; ``None`` when nothing does.

    On the CPU accelerate joins processes only in its CPU mode (``use_cpu``, or ``ACCELERATE_USE_CPU`` as
    ``accelerate launch --cpu`` sets it), over gloo; without it each process trains alone, with no gradient sync.
    Under DeepSpeed the CPU mode would skip DeepSpeed's set-up: there the process group needs ``ddp_backend="gloo"``,
    or accelerate and DeepSpeed disagree on the number of processes."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes <= 1 or torch.cuda.is_available():
        return None
    launched = f"{processes} processes were launched on a machine without CUDA"
    if config.deepspeed or strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        if config.ddp_backend is None:
            return (
                f"{launched} under DeepSpeed, with no ddp_backend: accelerate and DeepSpeed would disagree on the "
                "number of processes. Set ddp_backend='gloo' (--ddp_backend gloo)."
            )
        return None
    if not config.use_cpu and not strtobool(os.environ.get("ACCELERATE_USE_CPU", "false")):
        return (
            f"{launched}, with use_cpu=False: each would train alone, with no gradient sync. Set use_cpu=True "
            "(--use_cpu true), or launch with `accelerate launch --cpu`."
        )
    return None
