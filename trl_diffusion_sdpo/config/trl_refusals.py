"""The ``DPOConfig`` fields and ``DPOTrainer`` arguments with no counterpart on diffusion models, each refused in one
line that says what takes its place: by the config and the trainer from Python (a ``TypeError``, as Python's own for
an unknown keyword), by the command line as an unknown option or YAML key. What TRL's names that are read here do
(``loss_type``, ``beta``) is :mod:`.trl_habits`'s.

Imported by the command line's parser, and by the config and the trainer only when given a keyword they do not take:
a run from Python given only its own settings never loads these tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "TRL_CONFIG_NAMES",
    "TRL_TRAINER_ARGUMENTS",
    "refuse_trainer_arguments",
    "refuse_trl_names",
    "trl_name_refusal",
]

# The prompt's length: the UNet families' CLIP text encoders read 77 tokens; the flow families' max_sequence_length.
_PROMPT_TOKENS = (
    "prompts are cut at the text encoder's own limit (77 tokens for the UNet families' CLIP, max_sequence_length for "
    "the flow families') and images are sized by resolution"
)

#: ``DPOConfig`` fields (TRL 1.x, and a few of 0.x that TRL users still type) with no counterpart here, each with what
#: takes its place: the message that refuses it. The fields TRL and this package share (``beta``, ``loss_type``,
#: ``learning_rate`` and every ``TrainingArguments`` field) are not here: they are read.
TRL_CONFIG_NAMES: dict[str, str] = {
    "max_length": f"a language model's token limit on prompt plus completion; here {_PROMPT_TOKENS}",
    "max_prompt_length": f"a language model's token limit on the prompt; here {_PROMPT_TOKENS}",
    "max_completion_length": f"a language model's token limit on the completion; here {_PROMPT_TOKENS}",
    "truncation_mode": f"how a language model's sequence is cut; here {_PROMPT_TOKENS}",
    "padding_free": "packs token sequences; the denoiser's inputs are latents of one size per batch",
    "pad_to_multiple_of": "pads token sequences; the denoiser's inputs are latents of one size per batch",
    "pad_token": "pads token sequences; the denoiser's inputs are latents of one size per batch",
    "label_smoothing": (
        "cDPO's label noise; here a pair's label is its order (ties are dropped): for soft preferences use "
        "loss_type='smpo', which weights each pair by its score difference"
    ),
    "loss_weights": (
        "weighs several TRL losses; here one objective trains (loss_type), and Diffusion-DPO's SFT anchor on the "
        "winners is sft_weight"
    ),
    "rpo_alpha": "RPO's weight of the chosen completions' NLL; here the anchor on the winners' error is sft_weight",
    "precompute_ref_log_probs": (
        "the reference's errors depend on the noise drawn at each step, so they cannot be computed before training; "
        "cache_latents=True precomputes what can be (the VAE latents and prompt embeddings)"
    ),
    "precompute_ref_batch_size": (
        "the reference's errors depend on the noise drawn at each step, so they cannot be computed before training; "
        "cache_latents=True precomputes what can be (the VAE latents and prompt embeddings)"
    ),
    "use_weighting": "WPO's weights of token log-probabilities; diffusion pairs have no token log-probabilities",
    "ld_alpha": "LD-DPO's weight of the verbose tokens; diffusion pairs have no tokens",
    "f_divergence_type": "an f-divergence for TRL's language-model losses; Diffusion-DPO's is fixed (loss_type)",
    "f_alpha_divergence_coef": "an f-divergence for TRL's language-model losses; Diffusion-DPO's is fixed (loss_type)",
    "discopop_tau": "DiscoPOP's temperature; loss_type lists this package's objectives",
    "sync_ref_model": "TR-DPO's reference updates; the reference stays the frozen starting model",
    "ref_model_mixup_alpha": "TR-DPO's reference updates; the reference stays the frozen starting model",
    "ref_model_sync_steps": "TR-DPO's reference updates; the reference stays the frozen starting model",
    "disable_dropout": "a language model's dropout switch; the denoiser trains as its config sets it",
    "activation_offloading": (
        "offloads a language model's activations; here gradient_checkpointing trades compute for activation memory "
        "and offload_frozen_modules keeps the VAE and text encoders off the device"
    ),
    "model_init_kwargs": "loads a language model from a name; pass the diffusers pipeline, or its folder or Hub id",
    "trust_remote_code": "the pipelines load with diffusers' own classes, never with code a model's folder ships",
    "router_aux_loss_coef": "a mixture-of-experts language model's router loss; the denoisers have no router",
    "dataset_num_proc": "tokenizes a text dataset in processes; preference images are decoded as the pairs are read",
}

#: ``DPOTrainer`` arguments with no counterpart in ``DiffusionSDPOTrainer``, each with what takes its place. Those it
#: shares (``model``, ``ref_model``, ``args``, ``train_dataset``, ``eval_dataset``, ``callbacks``, ``optimizers``,
#: ``peft_config``) are its own parameters.
TRL_TRAINER_ARGUMENTS: dict[str, str] = {
    "processing_class": "the model family encodes prompts with the pipeline's own tokenizer(s) and text encoder(s)",
    "tokenizer": "the model family encodes prompts with the pipeline's own tokenizer(s) and text encoder(s)",
    "data_collator": "the pairs are collated by the data format's collator, read from the dataset's columns",
    "compute_metrics": "evaluation logs the preference metrics of eval_dataset (loss, implicit_acc, the deltas)",
    "quantization_config": "the frozen base is quantized with the train command's --base_quantization",
    "model_init": "pass the diffusers pipeline, or its folder or Hub id, as model",
}


def trl_name_refusal(name: str, arguments: Mapping[str, str] = TRL_CONFIG_NAMES) -> str | None:
    """The one line that refuses TRL's ``name`` (a ``DPOConfig`` field by default, or a ``DPOTrainer`` argument with
    ``arguments=TRL_TRAINER_ARGUMENTS``), saying what takes its place here; ``None`` for a name TRL does not use
    that way."""
    reason = arguments.get(name)
    return None if reason is None else f"{name} is TRL's setting for language models, not used here: {reason}"


def refuse_trl_names(given: Sequence[str], what: str, arguments: Mapping[str, str] = TRL_CONFIG_NAMES) -> None:
    """A ``TypeError`` (Python's for an unknown keyword) where ``given`` holds a TRL name ``what`` (the class) does not
    take, saying what takes its place; nothing otherwise (the caller's own check names any other keyword)."""
    for name in given:
        refusal = trl_name_refusal(name, arguments)
        if refusal is not None:
            raise TypeError(f"{what}: {refusal}.")


def refuse_trainer_arguments(given: Sequence[str], what: str) -> None:
    """A ``TypeError`` for the first of ``given``, the keyword arguments a trainer class (``what``) does not take: a
    ``DPOTrainer`` argument says what takes its place (:data:`TRL_TRAINER_ARGUMENTS`), any other name is refused in
    Python's words."""
    refuse_trl_names(given, what, TRL_TRAINER_ARGUMENTS)
    if given:
        raise TypeError(f"{what}.__init__() got an unexpected keyword argument {given[0]!r}")
