"""What a user of TRL's ``DPOTrainer`` types, and what it does here: with :mod:`.trl_refusals`, the home of every
answer the package gives to a TRL name (docs/trl.md is tested against both).

- ``loss_type``: TRL's ``"sigmoid"`` is this package's ``"dpo"`` (the same ``-logsigmoid(u)``), and TRL 1.x's list
  form is read as its one element (:func:`loss_type_name`); TRL combines several losses with ``loss_weights``, this
  package trains one objective (a list of several is refused).
- The ``DPOConfig`` fields and ``DPOTrainer`` arguments with no counterpart on diffusion models: refused in one line
  that says what takes their place, by :mod:`.trl_refusals`, which is loaded only when such a name is given.
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

from typing import Any

__all__ = [
    "LINEAR_LOGIT",
    "LOSS_TYPE_ALIASES",
    "MARGIN_BOUND",
    "loss_type_name",
    "weak_beta",
    "weak_beta_warning",
]

#: TRL's names of this package's objectives (``loss_type``): the same loss under another name
LOSS_TYPE_ALIASES: dict[str, str] = {"sigmoid": "dpo"}


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
