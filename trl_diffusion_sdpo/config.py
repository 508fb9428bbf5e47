"""Configuration of Diffusion-DPO / Diffusion-SDPO training."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from accelerate.utils import str_to_bool as strtobool
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from .checks import Choice, Range
from .objectives import DSPO_FORMS, OBJECTIVES, check_objective_config, objective_class

__all__ = ["DiffusionSDPOConfig"]

# The options of the config's choice fields: the fields' ``choices`` (what ``--help`` lists) and their checks.
SAFEGUARD_SPACES = ("output", "parameter", "update")
SAFEGUARD_SCOPES = ("local", "global", "pair")
SAFEGUARD_PASSES = ("one", "two")
NONFINITE_ACTIONS = ("skip", "raise")
# Kept equal to families.inversion's NOISING_MODES / INVERSION_NETWORKS (a test checks; the config imports no family).
NOISING_MODES = ("forward", "inversion")
INVERSION_NETWORKS = ("policy", "reference")


@dataclass
class DiffusionSDPOConfig(TrainingArguments):
    r"""
    Configuration class for [`DiffusionSDPOTrainer`].

    Only the parameters specific to preference tuning of diffusion models are listed here; see
    [`~transformers.TrainingArguments`] for the rest. Defaults follow the Diffusion-DPO launchers (Wallace et al.,
    arXiv 2311.12908) and the Diffusion-SDPO paper (Fu et al., arXiv 2511.03317) for SD1.5.

    > Parameters that control the objective

    Each objective reads the fields below that it declares, by name, and owns their rules (its class in
    `trl_diffusion_sdpo/objectives/`); every objective field is checked when the config is made, whatever `loss_type`.

    beta (`float`, *optional*, defaults to `5000.0`):
        KL-regularisation strength of Diffusion-DPO. The timestep count and weighting are folded into it; the paper
        reports 2000 to 5000 working. Larger values make the logit ``u`` more sensitive to error differences. For the
        flow-matching families (SD3, FLUX) the anchors use much smaller values (flow_grpo's SD3.5 Flow-DPO: 100 on
        per-sample mean velocity errors); see docs/sd3.md.
    loss_type (`str`, *optional*, defaults to `"dpo"`):
        Preference objective (formulas and the authors' settings per model family: `docs/objectives.md`).
        `"dpo"`: Diffusion-DPO, ``-logsigmoid(u)``. `"dspo"`: the score-matching form (authors' beta 0.001 for SD1.5
        with `dspo_form="sd15"`, 5000 for SDXL with `dspo_form="sdxl"`). `"dmpo"`: KL to a Bernoulli target
        (`dmpo_alpha`; beta 2000 SD1.5, 6000 SDXL). `"sft"`: supervised fine-tuning on the winners (no reference,
        no safeguard). `"mapo"`: reference-free margin-aware preference optimisation (`mapo_beta`,
        `mapo_snr_value`; no reference model is built or run). `"smpo"`: Diffusion-DPO with SmPO's smoothed
        preferences, each pair's logit weighted by ``smpo_gamma * (2p - 1)`` from two score columns. Or the name of an
        objective registered with `register_objective` before the config is made (its fields are read from the config
        fields of the same names).
    dmpo_alpha (`float`, *optional*, defaults to `0.01`):
        DMPO's target ``q = 1 - alpha`` (authors: 0.01).
    dspo_form (`str`, *optional*, defaults to `"sd15"`):
        Which of the authors' DSPO forms: `"sd15"` (winner residual plus the scaled policy-reference difference)
        or `"sdxl"` (the squared policy-reference difference weighted by ``(1 - sigmoid(u))^2``).
    mapo_beta (`float`, *optional*, defaults to `0.1`), mapo_snr_value (`float`, *optional*, defaults to `0.5`):
        MaPO's odds-ratio weight and the ``g`` of ``f(e) = g e / (exp(g e) - 1)`` (the MaPO authors' defaults).
    smpo_gamma (`float`, *optional*, defaults to `10.0`):
        SmPO's scale (> 0) of the per-pair logit weight ``gamma * (2p - 1)``, ``p = sigmoid(n_w - n_l)``.
    score_0_column, score_1_column (`str`, *optional*, defaults to `"score_0"`, `"score_1"`):
        Per-image score columns for `"smpo"` (the higher-scored image is the winner); or hand the trainer a
        ``reward_fn`` to score the images itself.
    smpo_score_min, smpo_score_max (`float`):
        The normalisation ``n = (s - min) / (max - min)`` of the scores; defaults are SmPO's constants for PickScore's
        raw cosine (0.11543526500463486, 0.28201571106910706).

    > Parameters that control the safeguard

    safeguard (`bool`, *optional*, defaults to `True`):
        Apply the Diffusion-SDPO winner-preserving safeguard: the loser error's gradient is scaled by a detached
        ``lambda`` so that, to first order, the winner's error does not increase. `False` is plain Diffusion-DPO.
    safeguard_mu (`float`, *optional*, defaults to `0.9`):
        Safeguard margin ``mu`` in [0, 1]; larger is more conservative. Authors: 0.9 for SD1.5 DPO and DMPO, 0.2 for
        SD1.5 DSPO, 0.6 for every SDXL run.
    safeguard_max_lambda (`float`, *optional*, defaults to `1.0`):
        Upper bound of ``lambda``.
    safeguard_space (`str`, *optional*, defaults to `"output"`):
        Where ``lambda`` is computed. `"output"`: the authors' rule on the policy's residuals (two sums, no extra
        pass), which treats the UNet's Jacobians on the two branches as equal. `"parameter"`: the exact rule, from
        the gradients of the loss's winner and loser terms over the trainable weights, one backward pass per branch
        (one extra gradient-sized buffer; see `docs/safeguard.md` for its guarantee, cost and the measured
        difference). Runs on one process, DDP, DeepSpeed ZeRO-1/2 and FSDP2 with `safeguard_scope="global"`;
        refused under ZeRO-3, FSDP1 and FSDP2 with the local scope (`docs/safeguard.md`, "Where the exact rule
        runs"). `"update"`: the same per-branch gradients, with
        ``lambda`` chosen on the optimizer's actual update (AdamW, Adam or SGD: momentum, second moment, weight
        decay and clipping included), so the winner's error does not rise to first order under the step taken;
        one process or DDP, `gradient_accumulation_steps=1`.
    safeguard_scope (`str`, *optional*, defaults to `"local"`):
        Which samples one ``lambda`` covers when several processes train. `"local"` (the authors' choice): each
        process computes ``lambda`` from its own micro-batch. `"global"`: the two sums behind ``lambda`` are summed
        over all processes, so every process uses the ``lambda`` of the global micro-batch (one extra all-reduce of
        two numbers per micro-batch); the run then matches a single process with the same global batch. On one
        process the two are the same. `"pair"` (`safeguard_space="parameter"`): one ``lambda_i`` per preference
        pair, from that pair's own gradients, so that pair ``i``'s safeguarded gradient does not raise pair ``i``'s
        winner term to first order (with margin ``mu``); not a guarantee for the batch sum, since other pairs'
        gradients still act on pair ``i`` (`docs/safeguard.md`). It keeps one gradient of the trainable weights per
        image: LoRA, or full tuning up to 4 GiB of them.
    safeguard_passes (`str`, *optional*, defaults to `"one"`):
        How the parameter and update spaces get the branches' gradients. `"one"`: one forward and one backward pass
        over the whole pair batch, as Diffusion-DPO, each weight's gradient split by branch inside it (per-layer
        taps); where that cannot run (DeepSpeed, FSDP2, a trainable weight outside Linear/ConvNd/norm/embedding
        layers) the step falls back to `"two"` and says once why. `"two"`: one forward and one backward pass per
        branch, the reference implementation.

    > Parameters that control the data

    resolution (`int`, *optional*, defaults to `512`):
        Training resolution: images are resized so their shorter side is this, then cropped to a square.
    random_crop (`bool`, *optional*, defaults to `False`):
        Random instead of center crop. Winner and loser share the crop position (relative to their size). The offsets
        come from the trainer's keyed draws (like the flips), so a resumed run crops as the uninterrupted one.
    random_flip (`bool`, *optional*, defaults to `True`):
        Flip horizontally with probability 0.5: both images of a pair together (MaPO's choice, and ours by default),
        or each image on its own with `independent_augmentation`.
    independent_augmentation (`bool`, *optional*, defaults to `False`):
        Flip (and, with `random_crop`, crop) each image of a pair independently, as the Diffusion-SDPO authors do,
        instead of the pair together.
    num_frames (`int` or `None`, *optional*, defaults to `None`):
        Video families (Wan): frames per clip, read from each video of a pair at `frame_stride` from its first frame
        and resized and cropped like an image, the same way for both videos. Wan needs `4k + 1` (81 as it samples;
        17 or 33 to save memory). `None`: the data are images.
    frame_stride (`int`, *optional*, defaults to `1`):
        Video families: keep every `frame_stride`-th frame (2 halves the frame rate of the clip the model sees).
    fixed_time_ids (`bool`, *optional*, defaults to `False`):
        SDXL only: condition every image on ``time_ids = (res, res, 0, 0, res, res)`` as the Diffusion-SDPO authors
        do, instead of its real original size and crop (the default, as SDXL was trained).
    proportion_empty_prompts (`float`, *optional*, defaults to `0.2`):
        Fraction of prompts replaced by the empty prompt during training (classifier-free guidance dropout).
    min_timestep (`int`, *optional*, defaults to `0`):
        Smallest training timestep (inclusive).
    max_timestep (`int` or `None`, *optional*, defaults to `None`):
        Largest training timestep (exclusive); `None` means the scheduler's ``num_train_timesteps``. UNet families
        only; the flow families draw noise levels with the ``flow_*`` settings.
    noising (`str` or `None`, *optional*, defaults to `None`):
        How the noised input is made: ``"forward"`` (``x_t`` from fresh noise, the target that noise) or
        ``"inversion"`` (SmPO's ReNoise inversion: ``x_t`` from inverting the clean latents with the network, no
        gradient, and the target the noise that ``x_t`` implies; DDIM inversion for the UNet families, Euler
        inversion of the velocity for the flow families; see ``docs/objectives.md``). `None`: ``"inversion"`` for
        ``loss_type="smpo"`` (the paper's method), ``"forward"`` otherwise. Any objective can use either.
    inversion_steps (`int` or `None`, *optional*, defaults to `None`):
        Length of the inversion grid; `None`: the family's default (SmPO: 5 for SD 1.x/2.x, 10 for SDXL; 10 for the
        flow families, this package's choice). A pair takes the grid points below its timestep, so the cost per pair
        is up to ``inversion_steps * inversion_renoise`` no-grad forward passes.
    inversion_renoise (`int`, *optional*, defaults to `2`):
        Network evaluations per inversion step, averaged (ReNoise; SmPO: 2; 1 is plain DDIM inversion).
    inversion_network (`str`, *optional*, defaults to `"policy"`):
        Which network inverts: ``"policy"`` (the model being trained, as SmPO's code does) or ``"reference"``.

    > Parameters of the flow-matching families (SD3 / SD3.5, FLUX.1)

    flow_weighting_scheme (`str` or `None`, *optional*, defaults to `None`):
        How the noise level ``s`` is drawn and weighted (diffusers' ``compute_density_for_timestep_sampling`` and
        ``compute_loss_weighting_for_sd3``): `"logit_normal"`, `"mode"`, `"none"` (uniform), `"sigma_sqrt"` or
        `"cosmap"` (uniform draws, weighted losses). `None`: the family's default (`"logit_normal"` for both).
    flow_logit_mean, flow_logit_std (`float`, *optional*, defaults to `0.0`, `1.0`), flow_mode_scale (`float`,
    *optional*, defaults to `1.29`):
        Parameters of the logit-normal and mode densities.
    flow_shift (`str` or `None`, *optional*, defaults to `None`):
        `"scheduler"`: levels from the training scheduler's sigma table (its static shift, 3.0 for SD3), as diffusers'
        scripts; `"resolution"`: FLUX's resolution-dependent shift on the unshifted table; `"none"`: unshifted.
        `None`: the family's default (SD3 `"scheduler"`, FLUX `"resolution"`).
    max_sequence_length (`int` or `None`, *optional*, defaults to `None`):
        Prompt tokens of a flow family's text encoder (T5 for SD3 and FLUX.1, UMT5 for Wan, the language model for
        Qwen-Image and its edit and 2.1 variants, Z-Image, FLUX.2 and HunyuanVideo 1.5); `None`: the family's default
        (SD3 77 as diffusers' SD3 LoRA script, the others 512).
    flux_guidance_scale (`float` or `None`, *optional*, defaults to `None`):
        The guidance value fed to the guidance embedding of FLUX.1-dev and FLUX.2 [dev] (policy and reference alike);
        and of a guidance-distilled Qwen-Image transformer (`guidance_embeds=True`); ignored by models without one
        (schnell, FLUX.2 [klein], the released Qwen-Image). `None`: the family's default (FLUX.1 3.5, as diffusers'
        FLUX script; FLUX.2 [dev] 4.0, its pipeline's sampling default; Qwen-Image 1.0).
    caption_column, image_0_column, image_1_column, label_0_column (`str`):
        Pick-a-Pic column names (defaults `"caption"`, `"jpg_0"`, `"jpg_1"`, `"label_0"`). ``label_0`` is 1 when
        image 0 is preferred, 0 when image 1 is, 0.5 for a tie (ties are dropped and counted).
    prompt_column, chosen_column, rejected_column (`str`):
        TRL preference column names (defaults `"prompt"`, `"chosen"`, `"rejected"`). Used when the Pick-a-Pic
        columns are absent.
    source_image_column, source_images_column (`str`):
        Editing data (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 with reference images): the column holding each row's
        source image (defaults `"source_image"`), or a list of them for multi-image editing (defaults
        `"source_images"`); the prompt column then holds the instruction. See docs/editing.md.
    skip_invalid_rows (`bool`, *optional*, defaults to `False`):
        By default a bad row (undecodable image, label outside {0, 0.5, 1}, missing value) raises a `ValueError`
        naming the row and column before training starts. With `True` such rows are skipped and counted.
    dataset_num_proc (`int` or `None`, *optional*, defaults to `None`):
        Processes used to validate the dataset's images before training.
    cache_latents (`bool`, *optional*, defaults to `False`):
        Encode every pair with the VAE and every prompt with the text encoder(s) once, before training, and train
        from the cached posterior mean and std (sampled afresh each step) and embeddings (see
        :mod:`~.data.latent_cache`). With `random_flip` both the flipped and unflipped pair are cached;
        prompt dropout substitutes the cached empty-prompt embedding; `random_crop=True` cannot be cached. The VAE
        and text encoders then stay on the CPU during training. Needs a map-style dataset.
    latent_cache_dir (`str` or `None`, *optional*, defaults to `None`):
        Where the latent cache is stored and looked up; `None` uses a folder beside the dataset's cache files (or the
        `datasets` cache for in-memory datasets). A cache is reused whenever model, transforms and data match.

    > Parameters that control robustness

    on_nonfinite_loss (`str`, *optional*, defaults to `"skip"`):
        What to do when a micro-batch's loss, or the gradient norm of an optimizer step, is NaN or infinite.
        `"skip"`: its gradients never reach the optimizer (the optimizer step that would include it is skipped and
        counted in `nonfinite_skipped`). `"raise"`: save a checkpoint of the last good state and stop with an error.
    preemption_signals (`list[str]`, *optional*, defaults to `["SIGTERM", "SIGUSR1"]`):
        Signals (what SLURM and Kubernetes send before killing a job) on which training finishes the current
        optimizer step, writes a checkpoint, logs its path and exits with status 75; resuming with
        `resume_from_checkpoint=True` continues bit-exactly. Every process stops after the same step. `[]` (or
        `["none"]`) turns it off. See `docs/reliability.md`.

    > Parameters that control evaluation

    eval_seed (`int`, *optional*, defaults to `0`):
        Seed of the noise and timesteps used in evaluation, so that two `evaluate()` calls agree.
    validation_prompts (`list[str]` or `None`, *optional*, defaults to `None`):
        Prompts sampled while training (off when `None`): at step 0 (the base model) and every `validation_steps`
        steps a grid of the policy's samples is saved as PNG under `output_dir/validation/` and logged to every
        tracker in `report_to` that takes images (see `docs/evaluation.md`).
    validation_seeds (`list[int]`, *optional*, defaults to `[0]`):
        One sample per prompt and seed; the same seeds every time, so grids compare across steps.
    validation_steps (`int`, *optional*, defaults to `500`):
        Validate every this many optimizer steps.
    validation_num_inference_steps (`int`, *optional*, defaults to `25`), validation_guidance_scale (`float` or
    `None`, *optional*, defaults to `None`):
        Sampling settings of the validation grid. `None`: the family's own guidance, 8.5 for SD 1.x/2.x and SDXL (the
        SDPO authors', in diffusers' convention), else the pipeline's default (3.5 for FLUX.1-dev, as training
        conditions on).
    validation_scorers (`list[str]`, *optional*, defaults to `[]`):
        Registered scorers (e.g. `"pickscore"`, `"clip"`) whose means are logged as `eval/reward/<name>`.
    validation_source_images (`list[str]` or `None`, *optional*, defaults to `None`):
        Editing families: one source image file per validation prompt (the prompt is then its instruction), so the
        grid shows edits of these images; an editing scorer among `validation_scorers` is given them. `None`: the
        editing pipeline samples from the prompt alone.

    > Defaults changed from `TrainingArguments`

    weight_decay (`float`, defaults to `0.01`):
        The Diffusion-SDPO authors' AdamW weight decay.
    learning_rate (`float`, defaults to `1e-8`) with scale_lr (`bool`, defaults to `True`):
        The authors' recipe: the learning rate is multiplied by ``processes * per_device_batch * accumulation``
        (2.048e-5 at their effective batch of 2048 pairs). Set `scale_lr=False` to use `learning_rate` as given.
    lr_scheduler_type, warmup_steps, max_grad_norm (defaults to `"constant_with_warmup"`, `500`, `1.0`):
        The authors' schedule (constant after a linear warmup) and gradient clipping.
    logging_steps (defaults to `10`):
        Log every 10 optimizer steps.
    ddp_backend, use_cpu (when several processes run on a machine without CUDA):
        `"gloo"`, and `use_cpu=True` outside DeepSpeed; otherwise accelerate would run each process as a lone one,
        or disagree with DeepSpeed about the number of processes.
    remove_unused_columns (defaults to `False`):
        The collator needs the image columns.
    logging_nan_inf_filter (defaults to `False`):
        Its check makes the host wait for the device every step; the trainer keeps non-finite micro-batch losses out
        of the logged loss on the device instead.
    """

    # Objective
    beta: float = field(
        default=5000.0,
        metadata={"help": "Diffusion-DPO beta (KL strength); the paper reports 2000-5000 working."},
    )
    loss_type: str = field(
        default="dpo",
        metadata={
            "help": f"Preference objective: {', '.join(OBJECTIVES)}, or the name of one registered with "
            "register_objective (checked against the registry when the config is made)."
        },
    )
    dmpo_alpha: float = field(default=0.01, metadata={"help": "DMPO target q = 1 - alpha (authors: 0.01)."})
    dspo_form: str = field(
        default="sd15",
        metadata={"help": "DSPO form of the authors' code: 'sd15' or 'sdxl'.", "choices": list(DSPO_FORMS)},
    )
    mapo_beta: float = field(default=0.1, metadata={"help": "MaPO odds-ratio weight (MaPO authors: 0.1)."})
    mapo_snr_value: float = field(default=0.5, metadata={"help": "MaPO's g in f(e) = g e / (exp(g e) - 1)."})
    smpo_gamma: float = field(default=10.0, metadata={"help": "SmPO logit weight scale: gamma * (2p - 1)."})
    score_0_column: str = field(default="score_0", metadata={"help": "SmPO: score column of the first image."})
    score_1_column: str = field(default="score_1", metadata={"help": "SmPO: score column of the second image."})
    smpo_score_min: float = field(
        default=0.11543526500463486, metadata={"help": "SmPO score normalisation minimum (PickScore raw cosine)."}
    )
    smpo_score_max: float = field(
        default=0.28201571106910706, metadata={"help": "SmPO score normalisation maximum (PickScore raw cosine)."}
    )
    # Safeguard
    safeguard: bool = field(
        default=True,
        metadata={"help": "Apply the Diffusion-SDPO winner-preserving safeguard; False gives plain Diffusion-DPO."},
    )
    safeguard_mu: float = field(
        default=0.9,
        metadata={"help": "Safeguard margin mu in [0, 1] (authors: 0.9 SD1.5 DPO, 0.2 SD1.5 DSPO, 0.6 SDXL)."},
    )
    safeguard_max_lambda: float = field(default=1.0, metadata={"help": "Upper bound of the safeguard lambda."})
    safeguard_space: str = field(
        default="output",
        metadata={
            "help": "'output': the authors' rule on residuals; 'parameter': the exact rule from per-branch "
            "parameter gradients (one backward per branch); 'update': lambda chosen on the optimizer's actual update "
            "(AdamW/Adam/SGD).",
            "choices": list(SAFEGUARD_SPACES),
        },
    )
    safeguard_scope: str = field(
        default="local",
        metadata={
            "help": "'local': one lambda per process micro-batch (authors); 'global': lambda of the global "
            "micro-batch, its sums all-reduced.",
            "choices": list(SAFEGUARD_SCOPES),
        },
    )
    safeguard_passes: str = field(
        default="one",
        metadata={
            "help": "'one': one forward and backward pass, the branches' weight gradients split inside it (falls back "
            "to 'two' where it cannot, and says why); 'two': one pass per branch (the reference implementation).",
            "choices": list(SAFEGUARD_PASSES),
        },
    )
    # Data
    resolution: int = field(default=512, metadata={"help": "Square training resolution in pixels."})
    random_crop: bool = field(default=False, metadata={"help": "Random crop instead of center crop."})
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flip (per pair by default)."})
    independent_augmentation: bool = field(
        default=False, metadata={"help": "Flip and crop each image of a pair independently (the SDPO authors')."}
    )
    num_frames: int | None = field(
        default=None, metadata={"help": "Video families (Wan): frames per clip (Wan: 4k + 1); None: image data."}
    )
    frame_stride: int = field(default=1, metadata={"help": "Video families: keep every frame_stride-th frame."})
    fixed_time_ids: bool = field(
        default=False, metadata={"help": "SDXL: time_ids fixed to (res, res, 0, 0, res, res) (the SDPO authors')."}
    )
    proportion_empty_prompts: float = field(
        default=0.2, metadata={"help": "Fraction of prompts replaced by the empty prompt during training."}
    )
    min_timestep: int = field(default=0, metadata={"help": "Smallest training timestep (inclusive)."})
    max_timestep: int | None = field(
        default=None, metadata={"help": "Largest training timestep (exclusive); None: num_train_timesteps."}
    )
    noising: str | None = field(
        default=None,
        metadata={
            "help": "'forward' (fresh noise) or 'inversion' (SmPO's ReNoise inversion); None: 'inversion' for "
            "loss_type='smpo', else 'forward'.",
            "choices": list(NOISING_MODES),
        },
    )
    inversion_steps: int | None = field(
        default=None,
        metadata={"help": "Inversion grid length; None: the family's (SmPO: 5 SD1.x/2.x, 10 SDXL; 10 flow)."},
    )
    inversion_renoise: int = field(
        default=2, metadata={"help": "Network evaluations per inversion step, averaged (SmPO: 2)."}
    )
    inversion_network: str = field(
        default="policy",
        metadata={
            "help": "Which network inverts: 'policy' (SmPO's code) or 'reference'.",
            "choices": list(INVERSION_NETWORKS),
        },
    )
    flow_weighting_scheme: str | None = field(
        default=None,
        metadata={
            "help": "Flow families: noise-level density and loss weighting (logit_normal, mode, none, "
            "sigma_sqrt, cosmap); None: the family's default."
        },
    )
    flow_logit_mean: float = field(default=0.0, metadata={"help": "Flow families: logit-normal mean."})
    flow_logit_std: float = field(default=1.0, metadata={"help": "Flow families: logit-normal std."})
    flow_mode_scale: float = field(default=1.29, metadata={"help": "Flow families: mode-sampling scale."})
    flow_shift: str | None = field(
        default=None,
        metadata={"help": "Flow families: sigma shift (scheduler, resolution, none); None: the family's default."},
    )
    max_sequence_length: int | None = field(
        default=None,
        metadata={
            "help": "Flow families: prompt tokens of the text encoder; None: the family's default (SD3 77, else 512)."
        },
    )
    flux_guidance_scale: float | None = field(
        default=None,
        metadata={
            "help": "FLUX.1-dev / FLUX.2 [dev] / guidance-distilled Qwen-Image: guidance value of the guidance "
            "embedding while training; None: the family's default (3.5 / 4.0 / 1.0)."
        },
    )
    caption_column: str = field(default="caption", metadata={"help": "Pick-a-Pic caption column."})
    image_0_column: str = field(default="jpg_0", metadata={"help": "Pick-a-Pic first image column."})
    image_1_column: str = field(default="jpg_1", metadata={"help": "Pick-a-Pic second image column."})
    label_0_column: str = field(
        default="label_0", metadata={"help": "Pick-a-Pic label column: 1 image 0 wins, 0 image 1 wins, 0.5 tie."}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "TRL-format prompt column."})
    chosen_column: str = field(default="chosen", metadata={"help": "TRL-format preferred image column."})
    rejected_column: str = field(default="rejected", metadata={"help": "TRL-format rejected image column."})
    source_image_column: str = field(
        default="source_image", metadata={"help": "Editing data: the column of each row's source image."}
    )
    source_images_column: str = field(
        default="source_images", metadata={"help": "Editing data: the column of each row's list of source images."}
    )
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Skip and count bad rows instead of raising before training."}
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to validate the dataset's images."}
    )
    cache_latents: bool = field(
        default=False,
        metadata={"help": "Encode images and prompts once before training and train from the cache."},
    )
    latent_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of the latent cache; None: beside the dataset's cache files."}
    )
    # Robustness
    on_nonfinite_loss: str = field(
        default="skip",
        metadata={
            "help": "On a NaN/inf loss: 'skip' the optimizer step, or 'raise' after a checkpoint.",
            "choices": list(NONFINITE_ACTIONS),
        },
    )
    preemption_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        metadata={
            "help": "Signals that stop training after the current step with a checkpoint and exit status 75 "
            "(docs/reliability.md); [] or 'none': off."
        },
    )
    # Evaluation
    eval_seed: int = field(default=0, metadata={"help": "Seed of the fixed evaluation noise and timesteps."})
    validation_prompts: list[str] | None = field(
        default=None, metadata={"help": "Prompts sampled while training (grid saved and logged); None: off."}
    )
    validation_seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds of the grid."})
    validation_steps: int = field(default=500, metadata={"help": "Validate every N optimizer steps."})
    validation_num_inference_steps: int = field(default=25, metadata={"help": "Sampling steps of the grid."})
    validation_guidance_scale: float | None = field(
        default=None, metadata={"help": "Guidance of the grid (diffusers'); None: the family's own."}
    )
    validation_source_images: list[str] | None = field(
        default=None, metadata={"help": "Editing: a source image file per validation prompt."}
    )
    validation_scorers: list[str] = field(
        default_factory=list, metadata={"help": "Scorers logged as eval/reward/<name> at each validation."}
    )
    # Learning-rate scaling (authors' recipe)
    scale_lr: bool = field(
        default=True,
        metadata={"help": "Multiply learning_rate by processes * per-device batch * gradient accumulation."},
    )
    # Changed TrainingArguments defaults
    learning_rate: float = field(
        default=1e-8, metadata={"help": "Learning rate per pair (scaled by the effective batch, see scale_lr)."}
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="constant_with_warmup", metadata={"help": "Scheduler type (authors: constant after linear warmup)."}
    )
    warmup_steps: float = field(default=500, metadata={"help": "Linear warmup steps (authors: 500)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (authors: 1.0)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (SDPO authors: 0.01)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the image columns."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "transformers' per-step NaN check of the logged loss (a host sync); the trainer already "
            "keeps non-finite losses out of the log on the device."
        },
    )

    def __post_init__(self) -> None:
        # loss_type and the objective fields (beta, dmpo_alpha, ...) are checked by the registry and the objectives
        # that declare them, so an objective registered outside the package is accepted like a built-in one.
        check_objective_config(self)
        self._check_fields()
        if self.resolution % 8 != 0:
            raise ValueError(
                f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}"
            )
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise ValueError(
                f"max_timestep ({self.max_timestep}) must be larger than min_timestep ({self.min_timestep})"
            )
        if self.flow_weighting_scheme is not None or self.flow_shift is not None:
            from .families.flow import FLOW_SHIFTS, FLOW_WEIGHTING_SCHEMES  # the families own the names

            Choice(FLOW_WEIGHTING_SCHEMES, optional=True).check("flow_weighting_scheme", self.flow_weighting_scheme)
            Choice(FLOW_SHIFTS, optional=True).check("flow_shift", self.flow_shift)
        from .io.preemption import parse_signals  # validates the names

        parse_signals(self.preemption_signals)
        if self.cache_latents and self.random_crop:
            raise ValueError(
                "cache_latents=True cannot be combined with random_crop=True: each step would need a new crop of the "
                "pixels, which cached latents no longer hold. Use the center crop (random_crop=False), crop the "
                "images before training, or set cache_latents=False."
            )
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would drop the image columns; leave it False")
        if self.safeguard and self.safeguard_space == "update" and self.gradient_accumulation_steps != 1:
            raise ValueError(
                "safeguard_space='update' needs gradient_accumulation_steps=1: lambda is chosen on the optimizer's "
                "update, which depends on the whole accumulated gradient, known only at the last micro-batch. "
                "Raise per_device_train_batch_size instead, or use safeguard_space='parameter'."
            )
        if self.safeguard and self.safeguard_scope == "pair" and self.safeguard_space != "parameter":
            raise ValueError(
                f"safeguard_scope='pair' chooses one lambda per pair from that pair's parameter gradients: it needs "
                f"safeguard_space='parameter', got {self.safeguard_space!r}"
            )
        if self.safeguard and self.safeguard_scope == "pair" and self.safeguard_passes != "one":
            raise ValueError(
                "safeguard_scope='pair' needs safeguard_passes='one': its per-pair gradients come from it"
            )
        if self.safeguard and not objective_class(self.loss_type).uses_loser:
            raise ValueError(
                f"loss_type={self.loss_type!r} trains on the winners only: there is no loser gradient for the "
                "safeguard to scale. Set safeguard=False."
            )
        needs_reference = self.inverts and self.inversion_network == "reference"
        if needs_reference and not objective_class(self.loss_type).requires_reference:
            raise ValueError(
                f"inversion_network='reference' needs a reference model, and loss_type={self.loss_type!r} uses "
                "none; set inversion_network='policy' (as SmPO does) or noising='forward'."
            )
        if self.validation_prompts is not None and not self.validation_prompts:
            raise ValueError("validation_prompts must hold at least one prompt, or be None to turn validation off")
        if self.validation_source_images is not None and len(self.validation_source_images) != len(
            self.validation_prompts or []
        ):
            raise ValueError(
                f"validation_source_images holds {len(self.validation_source_images)} images for "
                f"{len(self.validation_prompts or [])} validation_prompts: give one source image per prompt"
            )
        if _launched_on_cpu_only():
            # Several processes, no GPU: without these, accelerate finds no device backend and runs each process as a
            # lone one (no gradient sync), and under DeepSpeed disagrees with it on the number of processes.
            if self.ddp_backend is None:
                self.ddp_backend = "gloo"
            if not self.deepspeed and not strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
                self.use_cpu = True
        super().__post_init__()

    @property
    def inverts(self) -> bool:
        """Whether the noised input comes from ReNoise inversion: ``noising="inversion"``, or ``noising=None`` with
        ``loss_type="smpo"``."""
        return self.noising == "inversion" or (self.noising is None and self.loss_type == "smpo")

    def _check_fields(self) -> None:
        """Every general numeric field is a finite number (an integer where one is needed) in its range, and every
        choice field one of its options, or a ValueError that names the field, the value and what to change
        (:class:`~.checks.Range`, :class:`~.checks.Choice`; the objective fields have their rules in their
        objectives)."""
        for name, rule in _FIELD_RULES.items():
            rule.check(name, getattr(self, name))


_FIELD_RULES: dict[str, Range | Choice] = {
    # the safeguard
    "safeguard_space": Choice(SAFEGUARD_SPACES),
    "safeguard_scope": Choice(SAFEGUARD_SCOPES),
    "safeguard_passes": Choice(SAFEGUARD_PASSES),
    "safeguard_mu": Range(0, 1, hint="Authors: 0.9 for SD1.5 DPO, 0.6 for SDXL."),
    "safeguard_max_lambda": Range(0, low_open=True, hint="The authors use 1.0."),
    # the data
    "resolution": Range(0, low_open=True, integer=True, hint="It must be a multiple of 8 (the VAE downsamples by 8)"),
    "num_frames": Range(1, integer=True, optional=True, hint="Wan needs 4k + 1 frames (81, 33, 17, ...)."),
    "frame_stride": Range(1, integer=True),
    "proportion_empty_prompts": Range(0, 1, hint="The authors drop 0.2 of the prompts."),
    "min_timestep": Range(0, integer=True),
    "max_timestep": Range(1, integer=True, optional=True, hint="None uses the scheduler's num_train_timesteps."),
    "noising": Choice(NOISING_MODES, optional=True),
    "inversion_steps": Range(1, integer=True, optional=True, hint="SmPO: 5 for SD1.5, 10 for SDXL."),
    "inversion_renoise": Range(1, integer=True, hint="SmPO evaluates twice per step (ReNoise)."),
    "inversion_network": Choice(INVERSION_NETWORKS),
    "dataset_num_proc": Range(1, integer=True, optional=True),
    # the flow-matching families
    "flow_logit_std": Range(0, low_open=True),
    "max_sequence_length": Range(1, integer=True, optional=True, hint="None uses the family's default."),
    # evaluation and validation
    "eval_seed": Range(0, integer=True),
    "validation_steps": Range(0, integer=True),
    "validation_num_inference_steps": Range(1, integer=True),
    "validation_guidance_scale": Range(optional=True, hint="None uses the family's guidance (8.5 for SD and SDXL)."),
    # TrainingArguments fields that fail late (inside torch, or as NaN weights) when wrong
    "learning_rate": Range(0, hint="The authors use 1e-8 per pair with scale_lr; LoRA typically 1e-5 to 1e-4."),
    "weight_decay": Range(0, hint="The SDPO authors use 0.01."),
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": Range(0, low_open=True),
    "max_grad_norm": Range(hint="0 or less turns clipping off; the authors clip at 1.0."),
    "warmup_steps": Range(0),
    "num_train_epochs": Range(0),
    "max_steps": Range(hint="-1 trains for num_train_epochs.", integer=True),
    "per_device_train_batch_size": Range(1, integer=True),
    "per_device_eval_batch_size": Range(1, integer=True),
    "gradient_accumulation_steps": Range(1, integer=True),
    "seed": Range(0, integer=True),
    # robustness
    "on_nonfinite_loss": Choice(NONFINITE_ACTIONS),
}


def _launched_on_cpu_only() -> bool:
    """Several processes were launched (torchrun / accelerate launch) and there is no CUDA device."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
