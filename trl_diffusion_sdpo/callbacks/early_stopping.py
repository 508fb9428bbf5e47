"""Early stopping (``--early_stopping_patience``): transformers' ``EarlyStoppingCallback`` on the held-out pairs, and
the config it needs. Loaded only by a run that stops early (the command line given ``--early_stopping_patience``)."""

from __future__ import annotations

from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

__all__ = ["EARLY_STOPPING_METRIC", "configure_early_stopping", "early_stopping"]

#: what early stopping watches unless ``metric_for_best_model`` is set: the held-out pairs' implicit accuracy (the
#: share of pairs whose chosen image the policy prefers more than the reference does), higher is better
EARLY_STOPPING_METRIC = "implicit_acc"


def configure_early_stopping(args: Any) -> None:
    """Set on ``args`` (a config already built) what transformers' ``EarlyStoppingCallback`` needs, keeping what the
    user set: ``metric_for_best_model`` (default :data:`EARLY_STOPPING_METRIC`), ``greater_is_better`` (transformers'
    rule: lower is better for a metric ending in ``loss``), ``load_best_model_at_end`` and evaluations at the saves'
    strategy and interval (the save strategy's when evaluation was off; ``steps`` when both were off).

    Raises ``ValueError`` naming the flags where the user set save and evaluation strategies that cannot match."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    evaluation, saving = IntervalStrategy(args.eval_strategy), SaveStrategy(args.save_strategy)
    if evaluation == IntervalStrategy.NO:
        evaluation = IntervalStrategy(saving.value) if saving.value in ("steps", "epoch") else IntervalStrategy.STEPS
    if saving in (SaveStrategy.NO, SaveStrategy.BEST) or saving.value != evaluation.value:
        if saving not in (SaveStrategy.NO, SaveStrategy.BEST) and args.eval_strategy != IntervalStrategy.NO:
            raise ValueError(
                f"early_stopping_patience keeps the best checkpoint, which needs save_strategy ({saving.value}) equal "
                f"to eval_strategy ({evaluation.value}): set both to steps or both to epoch"
            )
        saving = SaveStrategy(evaluation.value)
    args.eval_strategy, args.save_strategy = evaluation, saving
    if evaluation == IntervalStrategy.STEPS:
        args.eval_steps = args.eval_steps or args.save_steps
        if args.save_steps % args.eval_steps:
            raise ValueError(
                f"early_stopping_patience keeps the best checkpoint, which needs save_steps ({args.save_steps}) to be "
                f"a multiple of eval_steps ({args.eval_steps})"
            )
    if args.metric_for_best_model is None:
        args.metric_for_best_model = EARLY_STOPPING_METRIC
    if args.greater_is_better is None:
        args.greater_is_better = not args.metric_for_best_model.endswith("loss")
    args.load_best_model_at_end = True


def early_stopping(patience: int | None, threshold: float = 0.0) -> list[TrainerCallback]:
    """transformers' ``EarlyStoppingCallback`` with ``patience`` evaluations (none for ``None``); it needs
    ``metric_for_best_model`` and ``load_best_model_at_end``, which transformers checks when training starts."""
    if patience is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)]
