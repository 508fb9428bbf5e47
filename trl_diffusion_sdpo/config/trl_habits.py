"""What a user of TRL's ``DPOTrainer`` types, and what it does here: the one home of every answer the package gives to
a TRL name (docs/trl.md is tested against it).

- ``loss_type``: TRL's ``"sigmoid"`` is this package's ``"dpo"`` (the same ``-logsigmoid(u)``), and TRL 1.x's list
  form is read as its one element (:func:`loss_type_name`); TRL combines several losses with ``loss_weights``, this
  package trains one objective (a list of several is refused).
- The ``DPOConfig`` fields and ``DPOTrainer`` arguments with no counterpart on diffusion models
  (:data:`TRL_CONFIG_NAMES`, :data:`TRL_TRAINER_ARGUMENTS`): refused in one line that says what takes their place
  (:func:`trl_name_refusal`): by the config and the trainer from Python (a ``TypeError``, as Python's own for an
  unknown keyword), by the command line as an unknown option or YAML key.
- ``beta``: the same name, on another scale. The rule below (:func:`weak_beta_warning`) warns at the start of a run
  whose ``beta`` keeps the Diffusion-DPO loss at ``ln 2``.

The beta rule. The Diffusion-DPO logit is ``u = -0.5 * beta * m`` with the margin
``m = (e_w - e_l) - (e_ref_w - e_ref_l)``, a difference of differences of per-sample mean squared errors. Against a
target of unit variance (the UNets' noise or v; a flow model's velocity has about twice that) a model that predicts
better than zero has ``0 <= e <= 1``, so ``|m| <= 2`` (:data:`MARGIN_BOUND`) and ``|u| <= beta``. Below ``beta = 1``
the logit stays inside ``|u| < 1`` at any margin a model that still denoises can reach, and in practice far inside
it (the demo's policy-minus-reference deltas are 1e-3 to 1e-2, so ``|u|`` about 1e-3 at ``beta = 0.1``): the loss
``-logsigmoid(u) ~ ln 2 - u / 2`` shows nothing, and it is linear in the margin, so the sigmoid never saturates and
nothing pulls the policy back toward the reference. What the optimizer then does: at ``u = 0`` the gradient is
``beta / 4`` times the margin's. SGD's step is proportional to it, so the weights move ``beta / family beta`` as far
(2e-5 at 0.1 against 5000): nothing trains. AdamW divides the gradient by its own running scale, so the weights move
about as far as at the family's ``beta`` (within 25% over two steps on the tests' tiny pipeline:
``tests/training/test_trl_habits.py``), training a margin objective with no pull toward the reference. A warning at
the start, not a refusal: the run is defined (a deliberately linear objective is possible), and the family's value is
known only once the pipeline is, so the warning can name it with its source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LINEAR_LOGIT",
    "LOSS_TYPE_ALIASES",
    "MARGIN_BOUND",
    "TRL_CONFIG_NAMES",
    "TRL_TRAINER_ARGUMENTS",
    "loss_type_name",
    "refuse_trainer_arguments",
    "refuse_trl_names",
    "trl_name_refusal",
    "weak_beta",
    "weak_beta_warning",
]

#: TRL's names of this package's objectives (``loss_type``): the same loss under another name
LOSS_TYPE_ALIASES: dict[str, str] = {"sigmoid": "dpo"}

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


def loss_type_name(value: Any) -> Any:
    """``loss_type`` as the objectives' registry names it: TRL's name of the same loss (:data:`LOSS_TYPE_ALIASES`) as
    this package's, and TRL 1.x's list form read as its one element; a list of several is a ``ValueError`` (one
    objective trains). Any other value is returned unchanged for the objectives' check to name."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(
                f"loss_type={list(value)!r}: one objective trains per run (TRL's list combines losses with "
                "loss_weights); give one name, e.g. loss_type='dpo' (TRL's 'sigmoid'), and sft_weight for an SFT "
                "anchor on the winners."
            )
        value = value[0]
    return LOSS_TYPE_ALIASES.get(value, value) if isinstance(value, str) else value


#: the largest ``|m|`` of a policy and reference that predict a unit-variance target better than zero (each error in
#: ``[0, 1]``); see the module docstring
MARGIN_BOUND = 2.0
#: ``|u|`` up to which ``-logsigmoid(u)`` is close to its tangent at 0 (``ln 2 - u / 2``, off by 0.12 at ``|u| = 1``):
#: the gradient factor ``sigmoid(-u)`` stays within 0.27 of its start 0.5
LINEAR_LOGIT = 1.0


def weak_beta(beta: float) -> bool:
    """Whether ``beta`` keeps the Diffusion-DPO logit within :data:`LINEAR_LOGIT` at every margin up to
    :data:`MARGIN_BOUND`: ``0.5 * beta * MARGIN_BOUND < LINEAR_LOGIT`` (``beta < 1``)."""
    return 0.5 * beta * MARGIN_BOUND < LINEAR_LOGIT


def weak_beta_warning(beta: float, family: str, family_beta: float, source: str) -> str | None:
    """The start's warning for a ``beta`` that scales the Diffusion-DPO logit and is :func:`weak_beta`, naming the
    family's value (``family_beta`` from ``source``); ``None`` otherwise."""
    if not weak_beta(beta):
        return None
    bound = 0.5 * beta * MARGIN_BOUND
    return (
        f"beta={beta:g} keeps the loss at ln 2: the logit u = -0.5 * beta * ((e_w - e_l) - (e_ref_w - e_ref_l)) "
        f"multiplies a difference of squared-error differences of at most {MARGIN_BOUND:g} (in practice 1e-3 to "
        f"1e-2), so |u| <= {bound:.3g}, where the loss is linear in the margin and nothing pulls the policy back "
        f"toward the reference (AdamW still moves the weights; SGD moves them {beta / family_beta:.2g} times as far "
        f"as at the family's beta). TRL's beta is on another scale: {family}'s is {family_beta:g} ({source}); leave "
        "beta unset for it."
    )
