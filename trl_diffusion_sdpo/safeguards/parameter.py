"""The exact rule: ``lambda`` from the parameter gradients of the two branches, or from the optimizer's update.

``safeguard_space="parameter"`` (:class:`ParameterSpace`) chooses ``lambda`` by the package's rule
(:mod:`trl_diffusion_sdpo.safeguards`) on the trainable weights' gradients ``g_w`` and ``h_l`` themselves
(:func:`parameter_space_lambda`, :func:`safeguarded_gradients`): per micro-batch, per process or for the global
micro-batch, or per pair with ``safeguard_scope="pair"``. ``safeguard_space="update"``
(:class:`~trl_diffusion_sdpo.safeguards.update_space.UpdateSpace`, a subclass in its own module) chooses it so that the
optimizer's actual update keeps the winner's error from rising to first order, on the same separated branches. With
:meth:`ParameterSpace.log_output_lambda` a step also records the authors' output-space ``lambda`` on the same
micro-batch, for comparison.

Both ask the trainer for a backward that keeps the branches apart (:class:`ParameterSpaceBackward`, on the
unwrapped denoiser) and choose ``lambda`` in their hook after it (:meth:`ParameterSpace.combine`). By default the
backward is one forward and one backward pass over the whole pair batch, like Diffusion-DPO's, with each trainable
weight's gradient split by branch inside it (per-layer taps,
:mod:`~trl_diffusion_sdpo.safeguards.gradients.layer_taps`; the store is
:class:`~trl_diffusion_sdpo.safeguards.gradients.one_pass.OnePassBranchGradients`)::

    predictions (one pass, tapped) -> errors -> objective -> each branch's cotangent dL/dpred (loss_cotangents)
    -> one backward, weight gradients split by rows: g_w, h_l                        (OnePass)
    -> hook: lambda = f(<g_w, g_w>, <g_w, h_l>)                                      (ParameterSpace.combine)
    -> .grad += g_w + lambda * h_l (or the engine's own gradient store) -> (several processes) the engine's
    collectives                                                                      (SeparatedBranches.combine)

``lambda`` is a 0-dim device tensor from the inner products to the combination: a step reads nothing back to the host.
Whether the one pass can split the branches is decided once, at the first micro-batch (every process agreeing, one
read of the agreed flag where there are several); the steps after it only check, on the host's own list of the
layers that failed, that none did.

Where that cannot run (a trainable weight no tap covers, a layer that sees rows it cannot group,
``safeguard_passes="two"``) it runs the reference implementation: one forward and one backward pass per branch
(:class:`PerBranchPasses`, :mod:`~trl_diffusion_sdpo.safeguards.gradients.per_branch`), and says once why. The
per-pair scope splits by image instead: one ``lambda_i`` per pair, ``.grad += sum_i (g_w,i + lambda_i * h_l,i)`` (one
pass only). The reductions over processes are the engine's
:class:`~trl_diffusion_sdpo.safeguards.gradients.collectives.BranchCollectives`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engines import Engine
from ..engines.base import trainable_parameters
from ..engines.collectives import all_reduce_sum
from ..objectives import PreferencePredictions
from ..step.predictions import Evaluation
from .base import Safeguard
from .gradients import OnePassBranchGradients, PerBranchStore, collectives_for
from .margin import SafeguardMargin
from .passes import BackwardWindow, PassesInStep

if TYPE_CHECKING:
    from .output import OutputSpaceRule

__all__ = [
    "PAIR_SCOPE_MAX_FULL_BYTES",
    "SAFEGUARD_PASSES",
    "ParameterSpace",
    "OnePass",
    "ParameterSpaceBackward",
    "PerBranchPasses",
    "SeparatedBranches",
    "branch_cotangents",
    "check_pair_scope_memory",
    "gradient_dots",
    "loss_cotangents",
    "pair_scope_memory_bytes",
    "parameter_space_lambda",
    "safeguarded_gradients",
]

logger = logging.getLogger(__name__)

#: ``safeguard_passes``: "one" (one pass, the branches split inside it; two where it cannot split) or "two"
SAFEGUARD_PASSES = ("one", "two")

Predict = Callable[[bool], PreferencePredictions]  # separate_branches -> the micro-batch's predictions


#: Full tuning with the per-pair scope is refused above this many bytes of per-image gradients (small models pass)
PAIR_SCOPE_MAX_FULL_BYTES = 4 * 2**30


def pair_scope_memory_bytes(trainable_elements: int, pairs: int) -> int:
    """What the per-pair scope keeps: one float32 gradient of the trainable weights per image (``2 * pairs``)."""
    return 2 * pairs * trainable_elements * 4


def gradient_dots(
    winner_grads: Sequence[torch.Tensor | None], loser_grads: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(<g_w, g_w>, <g_w, h_l>)`` over lists of per-parameter gradients, accumulated in float32.

    ``None`` entries (a parameter without a gradient in that branch) count as zeros.
    """
    if len(winner_grads) != len(loser_grads):
        raise ValueError(f"{len(winner_grads)} winner gradients but {len(loser_grads)} loser gradients")
    sq = torch.zeros((), dtype=torch.float32)
    cross = torch.zeros((), dtype=torch.float32)
    for g_w, h_l in zip(winner_grads, loser_grads):
        if g_w is None:
            continue
        flat_w = g_w.detach().reshape(-1).float()
        sq = sq.to(flat_w.device) + torch.dot(flat_w, flat_w)
        if h_l is not None:
            cross = cross.to(flat_w.device) + torch.dot(flat_w, h_l.detach().reshape(-1).float())
    return sq, cross.to(sq.device)


def parameter_space_lambda(
    winner_sq_norm: torch.Tensor, winner_loser_dot: torch.Tensor, mu: float, max_lambda: float = 1.0
) -> torch.Tensor:
    """The exact Diffusion-SDPO ``lambda`` from parameter-gradient inner products (a detached float32 0-dim tensor)::

        lambda = clamp((1 - mu) * <g_w, g_w> / -<g_w, h_l>, 0, max_lambda)   if <g_w, h_l> < 0
        lambda = max_lambda                                                   otherwise

    Args:
        winner_sq_norm: ``<g_w, g_w>``.
        winner_loser_dot: ``<g_w, h_l>``, ``h_l`` the gradient of the loss's loser term as the loss sees it (the
            package's one convention, :mod:`trl_diffusion_sdpo.safeguards`): negative when the loser's term pushes
            the winner's error up, the case the safeguard restricts.
        mu: safeguard margin in [0, 1].
        max_lambda: upper bound of ``lambda``.
    """
    sq = winner_sq_norm.detach().float()
    rising = -winner_loser_dot.detach().float()  # -<g_w, h_l>: how much the loser's term raises the winner's error
    ratio = torch.where(
        rising > 0, (1.0 - mu) * sq / torch.where(rising > 0, rising, torch.ones_like(rising)), max_lambda
    )
    return ratio.clamp(min=0.0, max=max_lambda)


def safeguarded_gradients(
    winner_grads: Sequence[torch.Tensor | None],
    loser_grads: Sequence[torch.Tensor | None],
    mu: float,
    max_lambda: float = 1.0,
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """The parameter-space safeguard as a pure function: the gradient handed to the optimizer, and ``lambda``.

    Args:
        winner_grads: per-parameter gradients of the loss's winner term, ``g_w = d/dtheta <dL/dpred_w,
            pred_w(theta)>``.
        loser_grads: per-parameter gradients of the loss's loser term as the loss sees it,
            ``h_l = d/dtheta <dL/dpred_l, pred_l(theta)>``; the full Diffusion-DPO gradient is ``g_w + h_l``.
        mu: see :func:`parameter_space_lambda`.
        max_lambda: see :func:`parameter_space_lambda`.

    Returns:
        ``g_w + lambda * h_l`` (the Diffusion-DPO gradient with its loser term scaled by ``lambda``; ``lambda = 1``
        is plain Diffusion-DPO) and ``lambda``.

    Guarantee: let ``W(theta) = <dL/dpred_w, pred_w(theta)>`` be the loss's winner term with its coefficients held
    at their current values (for Diffusion-DPO ``W = sum_i a_i e_w,i`` with ``a_i = dL/de_w,i > 0``). A gradient step
    ``theta - eta * g`` with the returned ``g`` changes ``W`` by ``-eta <g_w, g> + O(eta^2)`` and
    ``<g_w, g> = |g_w|^2 + lambda <g_w, h_l> >= mu |g_w|^2 >= 0``: to first order the winner term does not increase.
    With equal pair weights ``a_i``, the case at the start of training (policy = reference, ``u = 0``), ``W`` is a
    positive multiple of the micro-batch's mean winner error. No assumption on the network's Jacobians is made.
    """
    sq, cross = gradient_dots(winner_grads, loser_grads)
    lam = parameter_space_lambda(sq, cross, mu, max_lambda)
    combined: list[torch.Tensor | None] = []
    for g_w, h_l in zip(winner_grads, loser_grads):
        if g_w is None and h_l is None:
            combined.append(None)
        elif h_l is None:
            combined.append(g_w.detach().clone())
        elif g_w is None:
            combined.append(lam.to(h_l) * h_l.detach())
        else:
            combined.append(g_w.detach() + lam.to(h_l) * h_l.detach())
    return combined, lam


def branch_cotangents(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], Any],
    policy_winner: torch.Tensor,
    policy_loser: torch.Tensor,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(value, dL/dpred_w, dL/dpred_l)``: the loss evaluated on detached copies of the two branches' predictions.

    ``loss_fn(pred_w, pred_l)`` must build everything that depends on the policy (errors, logits) from its two
    arguments; it returns the loss, or an object whose ``loss`` is it (returned as ``value``; a bare loss detached).
    The cotangents are cheap (prediction-sized); backpropagating each through its branch gives ``g_w`` and ``h_l``,
    and their sum is the loss's gradient (chain rule: the loss depends on the weights only through the two
    predictions).
    """
    winner = policy_winner.detach().requires_grad_(True)
    loser = policy_loser.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss_fn(winner, loser)
        loss = value.loss if hasattr(value, "loss") else value
        cot_w, cot_l = torch.autograd.grad(loss, (winner, loser), allow_unused=True)
    cot_w = torch.zeros_like(winner) if cot_w is None else cot_w
    cot_l = torch.zeros_like(loser) if cot_l is None else cot_l
    return value if value is not loss else loss.detach(), cot_w, cot_l


class ParameterSpaceBackward:
    """The backward that keeps a micro-batch's winner and loser gradients apart, with margin ``mu`` and cap
    ``max_lambda`` on ``engine``: the trainer runs its :meth:`passes`, then the safeguard's hook chooses ``lambda``
    on the branches (:meth:`lambda_of`) and has them write ``g_w + lambda * h_l`` (:meth:`SeparatedBranches.combine`).

    ``global_scope``: one ``lambda`` for the global micro-batch (the inner products are reduced over processes),
    else one per process. ``pair_scope``: one ``lambda`` per pair (the one pass only). ``passes``: ``"one"`` (the
    default: one forward and one backward pass, falling back to two where the gradients cannot be split in one) or
    ``"two"`` (the per-branch passes, the reference implementation). The gradient stores are built at the first
    micro-batch (the engine exists by then).
    ``update_space``: the branches are for the update space's rule (its checks against the engine; both branches
    averaged over processes instead of the global scope's reductions: one ``lambda`` for the global micro-batch).
    """

    #: the passes run on the unwrapped denoiser, outside DDP's hooks: the collectives reduce what they would have
    through_engine = False

    def __init__(
        self,
        engine: Engine,
        mu: float | SafeguardMargin,
        max_lambda: float,
        global_scope: bool,
        *,
        update_space: bool = False,
        pair_scope: bool = False,
        passes: str = "one",
    ) -> None:
        # The config's rules (DiffusionSDPOConfig) exclude the pair scope with the update space or two passes.
        collectives = collectives_for(engine)
        if update_space:
            collectives.check_update_space()
            global_scope = False  # both branches' gradients are averaged instead (SeparatedBranches.gradients)
        else:
            collectives.check_parameter_space("pair" if pair_scope else "global" if global_scope else "local")
        if pair_scope and collectives.one_pass_reason() is not None:
            raise ValueError(f"safeguard_scope='pair' needs the one-pass split: {collectives.one_pass_reason()}")
        self.engine, self.collectives = engine, collectives
        self.margin = mu if isinstance(mu, SafeguardMargin) else SafeguardMargin(mu)
        self.max_lambda = max_lambda
        self.global_scope = global_scope and engine.num_processes > 1
        self.pair_scope = pair_scope
        self.update_space = update_space
        self.passes_option = passes
        self.store: PerBranchStore | None = None  # the per-branch passes' store, built when they run
        self.one_pass: OnePassBranchGradients | None = None
        #: why the per-branch passes run instead of one pass (``None``: one pass, or not decided yet)
        self.two_pass_reason: str | None = None
        self._decided = False
        self._probed = False

    @contextlib.contextmanager
    def engine_backward_deferred(self) -> Iterator[list[torch.Tensor]]:
        """Within the block, the engine's last backward of a micro-batch (DeepSpeed's, which also steps the engine at
        the window's end) is not run: the scalars it would backpropagate are collected in the list yielded, for
        transformers' step to backpropagate with its own ``accelerator.backward``."""
        deferred: list[torch.Tensor] = []
        self.collectives.deferred = deferred
        try:
            yield deferred
        finally:
            self.collectives.deferred = None

    @property
    def mu(self) -> float | torch.Tensor:
        """``mu`` in force (``safeguard_mu="auto"`` moves it between optimizer steps)."""
        return self.margin.value

    def passes(self, policy: torch.nn.Module, window: BackwardWindow) -> Iterator[OnePass | PerBranchPasses]:
        """The micro-batch's passes over ``policy`` (the unwrapped denoiser), each scaled as the engine's backward
        would scale the loss (the accumulation average, the fp16 loss scale): the tapped one pass where it can run,
        else, or where the first micro-batch's could not split its branches, one pass per branch."""
        yield from self._passes(policy, window, self._backward_scale(window))

    def in_step(
        self,
        policy: torch.nn.Module,
        accumulation_steps: int,
        sync_gradients: bool,
        context: Callable[[], contextlib.AbstractContextManager],
        placement: str,
        combine: Callable[[Any], dict[str, Any]] | None,
    ) -> PassesInStep:
        """The micro-batch's :meth:`passes` inside transformers' step, where the engine places them (its
        ``passes_placement``; ``combine``, the safeguard's hook, for ``"with_combination"``)."""
        window = BackwardWindow(accumulation_steps, sync_gradients)
        return PassesInStep(self, policy, window, context, placement, combine)

    def _passes(
        self, policy: torch.nn.Module, window: BackwardWindow, scale: torch.Tensor
    ) -> Iterator[OnePass | PerBranchPasses]:
        if not self._decided:
            self._decide(policy)
        if self.one_pass is not None:
            one = OnePass(self, window, scale)
            yield one
            if one.branches is not None:
                return
        yield PerBranchPasses(self, policy, window, scale)

    def _backward_scale(self, window: BackwardWindow) -> torch.Tensor:
        """What the engine's backward multiplies a loss by: the accumulation average and the fp16 grad scaler's
        current scale (a device tensor: no host sync)."""
        accelerator = self.engine.accelerator
        scale = torch.full((), 1.0 / window.accumulation_steps, device=accelerator.device)
        return scale if accelerator.scaler is None else accelerator.scaler.scale(scale)

    def lambda_of(self, branches: SeparatedBranches, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """The parameter space's ``lambda`` on ``branches``: from ``<g_w, g_w>`` and ``<g_w, h_l>`` (one per pair
        with the pair scope)."""
        winner_sq, cross = branches.sums()
        return parameter_space_lambda(winner_sq, cross, self.mu, self.max_lambda)

    def __call__(
        self,
        policy: torch.nn.Module,
        predict: Predict,
        evaluate: Callable[[PreferencePredictions], Evaluation | torch.Tensor],
        scale: torch.Tensor,
        *,
        contributes: bool = True,
        sync_gradients: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        pairs: int | None = None,
        rule: Callable[[SeparatedBranches, torch.optim.Optimizer | None], torch.Tensor] | None = None,
    ) -> tuple[Evaluation | torch.Tensor, torch.Tensor, PreferencePredictions]:
        """This stage alone, as the trainer's step runs it (for tests and benchmarks without a trainer):
        ``(evaluation, lambda, predictions)`` after adding ``scale * (g_w + lambda * h_l)`` to the gradients (the
        pair scope: ``lambda`` holds one value per pair).

        Args:
            policy: the unwrapped denoiser (the passes bypass DDP's hooks; the engine reduces once).
            predict: the micro-batch's predictions, ``predict(separate_branches)``: one forward pass over both
                branches (``False``) or one per branch (``True``); called again, on the same noised pair, where the
                first micro-batch falls back to the per-branch passes.
            evaluate: errors and objective of a micro-batch's predictions (an
                :class:`~trl_diffusion_sdpo.step.predictions.Evaluation`, or the loss alone).
            scale: what a plain backward would multiply the loss by (accumulation average, fp16 loss scale).
            contributes: ``False`` for a replayed micro-batch that joins the other processes' collectives with a
                zero contribution.
            sync_gradients: whether this micro-batch closes the accumulation window.
            optimizer: the training optimizer, read (never changed) by the update space.
            pairs: the micro-batch's number of pairs (the pair scope groups rows by it).
            rule: ``lambda`` from the branches and the optimizer (the update space's
                :class:`~trl_diffusion_sdpo.safeguards.update_space.UpdateSpaceRule`); by default
                :meth:`lambda_of`.
        """
        window = BackwardWindow(sync_gradients=sync_gradients, contributes=contributes, pairs=pairs)
        for gradient_pass in self._passes(policy, window, scale):
            with gradient_pass:
                predictions = predict(gradient_pass.separate_branches)
                evaluation = evaluate(predictions)
                gradient_pass.backward(getattr(evaluation, "loss", evaluation), predictions)
        lam = (rule or self.lambda_of)(gradient_pass.branches, optimizer)
        gradient_pass.branches.combine(lam)
        return evaluation, lam, predictions

    # ------------------------------------------------------------------ which passes

    def _decide(self, policy: torch.nn.Module) -> None:
        """One pass where the engine, the trainable weights and ``passes`` allow it; else why not, said once. A
        compiled ``policy`` (``torch_compile``) runs the per-branch passes: the one pass's per-layer taps write the
        branches' gradients from inside autograd Functions, which break ``torch.compile``'s graph at every layer,
        while each per-branch pass is a plain forward and backward of the compiled module."""
        self._decided = True
        compiled = self.collectives.runs_compiled(policy)
        if self.passes_option == "two":
            reason = "safeguard_passes='two'"
        elif compiled and self.update_space and not self.collectives.two_pass_update_space:
            # the per-branch passes leave the winner's gradient inside this engine, where the update space cannot
            # read it: the tapped one pass runs in the compiled module, its graph broken at every tap
            logger.warning(
                "The exact safeguard's update space under %s runs the tapped one pass in the compiled denoiser: "
                "its per-branch passes would keep the winner's gradient inside the engine, and the taps break the "
                "compiled graph at every layer.",
                self.engine.name,
            )
            reason = self.collectives.one_pass_reason()
        elif compiled:
            reason = (
                "the denoiser is compiled (torch_compile), which captures the per-branch passes whole and would "
                "break its graph at every per-layer tap of the one pass"
            )
        else:
            reason = self.collectives.one_pass_reason()
        if reason is None:
            store = self.collectives.one_pass_store(policy, trainable_parameters(policy))
            if store.uncovered:
                shown = ", ".join(store.uncovered[:5]) + (", ..." if len(store.uncovered) > 5 else "")
                reason = (
                    f"{len(store.uncovered)} trainable parameter(s) are held by modules no per-layer tap covers "
                    f"({shown}); only Linear, ConvNd, norm and embedding layers are split"
                )
            else:
                self.one_pass = store
        if reason is not None:
            self._fall_back(reason)

    def _fall_back(self, reason: str) -> None:
        self.one_pass, self.two_pass_reason = None, reason
        if self.pair_scope:
            raise ValueError(f"safeguard_scope='pair' needs the one-pass split, which cannot run here: {reason}")
        if self.update_space and not self.collectives.two_pass_update_space:
            raise ValueError(
                f"safeguard_space='update' under {self.engine.name} needs the one-pass split (the per-branch passes "
                f"keep the winner's gradient inside the engine), which cannot run here: {reason}. Use "
                "safeguard_space='parameter', or DDP or FSDP2 with safeguard_space='update'."
            )
        if self.passes_option == "one":
            logger.warning("The exact safeguard runs one forward and backward pass per branch: %s.", reason)

    def _agreed(self, failed: bool) -> bool:
        """Whether any process failed (the fallback is a decision every process must take together); the flag is
        reduced on the weights' device (NCCL reduces device tensors only) and read on the host. A structural decision,
        taken once per run at the first micro-batch (the probe, :class:`OnePass`): the steps after it read nothing
        back, ``lambda`` stays a device tensor from the inner products to the combination."""
        if self.engine.num_processes == 1:
            return failed
        device = self.one_pass.parameters[0].device if self.one_pass is not None else None
        return bool(all_reduce_sum(torch.tensor(float(failed), device=device)).item() > 0)


def loss_cotangents(
    loss: torch.Tensor, predictions: PreferencePredictions, scale: torch.Tensor, contributes: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale * dL/dpred_w, scale * dL/dpred_l)``: the loss's gradient with respect to each branch's policy
    predictions, through the objective only (the network's part of the graph is left for the branches' backward);
    zeros for a micro-batch that does not contribute. Backpropagating each through its branch gives ``g_w`` and
    ``h_l``, and their sum is the loss's gradient (the loss depends on the weights only through the predictions)."""
    winner, loser = predictions.policy_winner, predictions.policy_loser
    cot_winner, cot_loser = torch.autograd.grad(loss, (winner, loser), allow_unused=True)
    cot_winner = torch.zeros_like(winner) if cot_winner is None else cot_winner
    cot_loser = torch.zeros_like(loser) if cot_loser is None else cot_loser
    if not contributes:
        return torch.zeros_like(cot_winner), torch.zeros_like(cot_loser)
    scale = scale.to(cot_winner)
    return cot_winner * scale, cot_loser * scale


class SeparatedBranches:
    """A micro-batch's winner and loser gradients after the backward, kept apart until ``lambda`` is known: what a
    safeguard's hook reads (:meth:`sums`, :meth:`gradients`) and what writes its combination (:meth:`combine`).

    Attributes:
        parameters: the trainable weights.
        predictions: the predictions the branches were backpropagated from.
        window: the micro-batch's place in its accumulation window.
        scale: what the backward multiplied the loss by (the optimizer's units are ``1 / scale`` of the branches').
    """

    def __init__(self, stage: ParameterSpaceBackward, predictions, window: BackwardWindow, scale) -> None:
        self.stage, self.collectives = stage, stage.collectives
        self.predictions, self.window, self.scale = predictions, window, scale
        self.reduced = False  # whether gradients() averaged both branches over processes already

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<g_w, g_w>, <g_w, h_l>)`` over the stage's scope (per pair: vectors of one value per pair)."""
        raise NotImplementedError

    def gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(g_w, h_l)`` per weight, averaged over processes in place (what the optimizer will see)."""
        raise NotImplementedError

    def combine(self, lam: torch.Tensor) -> None:
        """``.grad = A + g_w + lambda * h_l`` (or the engine's gradient store), reduced over processes as the
        engine's backward would have been."""
        raise NotImplementedError


class _OnePassBranches(SeparatedBranches):
    """The one pass's buffer: each weight's gradient split by branch (or by image, the pair scope) by the taps."""

    def __init__(self, stage, predictions, window, scale) -> None:
        super().__init__(stage, predictions, window, scale)
        self.store = stage.one_pass
        self.parameters = self.store.parameters

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stage.pair_scope:
            return self.collectives.reduce_pair_sums(*self.store.pair_sums())
        global_scope = self.stage.global_scope
        winner_sq, cross = self.store.branch_sums(self.collectives.winner_reduction(global_scope))
        return self.collectives.reduce_branch_sums(winner_sq, cross, global_scope)

    def gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        winner, loser = self.store.branch_gradients()
        self.collectives.reduce_branch_gradients(winner, loser)
        self.reduced = True
        return winner, loser

    def combine(self, lam: torch.Tensor) -> None:
        store = self.store
        combined = store.pair_combination(lam) if self.stage.pair_scope else store.combination(lam)
        self.collectives.add_combined(store, combined, self.window.sync_gradients, reduced=self.reduced)


class _PerBranchBranches(SeparatedBranches):
    """The per-branch passes' store, the gradients accumulated before the micro-batch set aside until combined."""

    def __init__(self, stage, predictions, window, scale, sums, accumulated) -> None:
        super().__init__(stage, predictions, window, scale)
        self.store = stage.store
        self.parameters = self.store.parameters
        self._sums, self._accumulated = sums, accumulated
        self._gradients: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collectives.reduce_branch_sums(*self._sums, self.stage.global_scope)

    def gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        winner, loser = self.store.branch_gradients()
        self.collectives.reduce_branch_gradients(winner, loser)
        self.reduced, self._gradients = True, (winner, loser)
        return winner, loser

    def combine(self, lam: torch.Tensor) -> None:
        store, collectives = self.store, self.collectives
        if self._gradients is not None:  # the update space: both branches already averaged over processes
            store.set_combined(lam, *self._gradients)
            collectives.restore_accumulated(store.parameters, self._accumulated)
            return
        store.combine(lam)
        collectives.restore_accumulated(store.parameters, self._accumulated)
        collectives.reduce_combined_gradients(store.parameters, self.window.sync_gradients)


class OnePass:
    """One forward and one backward pass over both branches, the taps splitting each weight's gradient by branch
    (or by image) inside it. Where a layer could not split its rows (the first micro-batch, every process agreeing)
    it forms no gradient and :attr:`branches` stays ``None``: the per-branch passes follow."""

    separate_branches = False

    def __init__(self, stage: ParameterSpaceBackward, window: BackwardWindow, scale: torch.Tensor) -> None:
        if stage.pair_scope and window.pairs is None:
            raise ValueError("the pair scope needs the micro-batch's number of pairs (pairs=)")
        self.stage, self.window, self.scale = stage, window, scale
        self.branches: SeparatedBranches | None = None
        self._contexts = contextlib.ExitStack()
        self._failed = False
        self._predictions: PreferencePredictions | None = None

    def __enter__(self) -> OnePass:
        stage, store = self.stage, self.stage.one_pass
        self._probe = not stage._probed
        self._before = store.grad_states() if self._probe else None
        groups = 2 * self.window.pairs if stage.pair_scope else 2
        self._contexts.enter_context(store.split(groups))
        self._contexts.enter_context(stage.collectives.tapped_pass(store.parameters))
        return self

    def backward(
        self, loss: torch.Tensor, predictions: PreferencePredictions, scale: torch.Tensor | None = None
    ) -> None:
        if scale is not None:  # the engine's own: what transformers' step handed its backward
            self.scale = scale
        stage, store = self.stage, self.stage.one_pass
        failed = bool(store.failures)
        if self._probe:
            failed = stage._agreed(failed)
        elif failed:
            raise RuntimeError(
                "a layer could not be tapped in this micro-batch although it was in the first: "
                + "; ".join(store.failures[:3])
            )
        if failed:
            self._failed = True
            return
        cot_winner, cot_loser = loss_cotangents(loss, predictions, self.scale, self.window.contributes)
        outputs = (predictions.policy_winner, predictions.policy_loser)
        stage.collectives.tapped_backward(outputs, (cot_winner, cot_loser))
        self._predictions = predictions

    def __exit__(self, *exc: object) -> None:
        self._contexts.close()
        if exc[0] is not None:
            return
        stage, store = self.stage, self.stage.one_pass
        if self._failed:
            stage._fall_back("layers saw rows they could not split by branch: " + "; ".join(store.failures[:3]))
            return
        if self._probe:
            stage._probed = True
            untapped = store.untapped_gradients(self._before)
            if stage._agreed(bool(untapped)):
                names = ", ".join(store.taps.names[i] for i in untapped[:5]) if untapped else "on another process"
                for i in untapped:
                    if self._before[i][0] is not None or stage.collectives.owns_gradients:
                        raise RuntimeError(
                            f"trainable weights received gradients outside their layers' taps ({names}) while "
                            "holding accumulated gradients (or under an engine that took them); set "
                            "safeguard_passes='two'"
                        )
                    store.parameters[i].grad = None
                stage._fall_back(f"gradients reached weights outside their layers' taps ({names})")
                return
        self.branches = _OnePassBranches(stage, self._predictions, self.window, self.scale)


class PerBranchPasses:
    """One forward and one backward pass per branch (the reference implementation of the split, and the one pass's
    fallback), the winner's gradient kept in the store while the loser's streams past it."""

    separate_branches = True

    def __init__(
        self, stage: ParameterSpaceBackward, policy: torch.nn.Module, window: BackwardWindow, scale: torch.Tensor
    ) -> None:
        self.stage, self.policy, self.window, self.scale = stage, policy, window, scale
        self.branches: SeparatedBranches | None = None

    def __enter__(self) -> PerBranchPasses:
        stage = self.stage
        if stage.store is None:
            stage.store = stage.collectives.per_branch_store(trainable_parameters(self.policy))
        self._accumulated = stage.collectives.set_aside_accumulated(self.policy, stage.store.parameters)
        return self

    def backward(
        self, loss: torch.Tensor, predictions: PreferencePredictions, scale: torch.Tensor | None = None
    ) -> None:
        if scale is not None:  # the engine's own: what transformers' step handed its backward
            self.scale = scale
        stage, store = self.stage, self.stage.store
        cot_winner, cot_loser = loss_cotangents(loss, predictions, self.scale, self.window.contributes)
        reduce_winner = stage.collectives.winner_reduction(stage.global_scope)
        winner_sq = store.backward_winner(predictions.policy_winner, cot_winner, reduce_winner)
        cross = store.backward_loser(predictions.policy_loser, cot_loser)
        self.branches = _PerBranchBranches(
            stage, predictions, self.window, self.scale, (winner_sq, cross), self._accumulated
        )

    def __exit__(self, *exc: object) -> None:
        return None


def check_pair_scope_memory(args, *, lora: bool, trainable_elements: int) -> None:
    """Refuse the per-pair scope for full tuning whose per-image gradients would take more than
    :data:`~trl_diffusion_sdpo.safeguards.parameter.PAIR_SCOPE_MAX_FULL_BYTES`, stating that figure."""
    pairs = args.per_device_train_batch_size
    need = pair_scope_memory_bytes(trainable_elements, pairs)
    if args.safeguard_scope == "pair" and not lora and need > PAIR_SCOPE_MAX_FULL_BYTES:
        raise ValueError(
            f"safeguard_scope='pair' keeps one float32 gradient of the trainable weights per image: 2 x {pairs} x "
            f"{trainable_elements:,} weights = {need / 2**30:.1f} GiB for full tuning here (SD1.5's UNet at 4 "
            f"pairs: 25.6 GiB; full tuning is accepted up to {PAIR_SCOPE_MAX_FULL_BYTES / 2**30:g} GiB). Train "
            "LoRA adapters (peft_config) with it, or use safeguard_scope='local'."
        )


class ParameterSpace(Safeguard):
    """``safeguard_space="parameter"``: ``lambda`` from ``<g_w, g_w>`` and ``<g_w, h_l>``, chosen by its hook
    (:meth:`combine`) after the backward its :attr:`backward_stage` runs with the branches kept apart.

    Args:
        lora: whether LoRA adapters are trained (the per-pair scope's memory check).
        trainable_elements: the number of trainable weights (the same check).
    """

    name = "parameter"
    metric_names = ("safeguard/lambda",)
    update_space = False

    def __init__(self, args, engine, *, lora: bool = True, trainable_elements: int = 0) -> None:
        super().__init__(args, engine)
        check_pair_scope_memory(args, lora=lora, trainable_elements=trainable_elements)
        self.backward_stage = ParameterSpaceBackward(
            engine,
            self.margin,
            args.safeguard_max_lambda,
            args.safeguard_scope == "global",
            update_space=self.update_space,
            pair_scope=args.safeguard_scope == "pair",
            passes=args.safeguard_passes,
        )
        self.output_rule: OutputSpaceRule | None = None

    def log_output_lambda(self, args) -> None:
        """Also compute the authors' output-space ``lambda`` on the same micro-batch and log it as
        ``safeguard/output_lambda_*``, for comparison (it is never applied): ``trainer.safeguard.log_output_lambda(
        trainer.args)`` before training. Opt-in, since it costs a pass over the residuals every micro-batch and, with
        the global scope, one more all-reduce."""
        if self.output_rule is None:
            from .output import OutputSpaceRule  # the output space's rule: imported when the comparison is asked for

            self.output_rule = OutputSpaceRule(args, self.engine.num_processes, self.margin)
            self.metric_names = (self.metric_names[0], "safeguard/output_lambda", *self.metric_names[1:])

    def combine(
        self, branches: SeparatedBranches, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, torch.Tensor | None]:
        lam = self.lambda_of(branches, optimizer)
        branches.combine(lam)
        lambdas = self._lambdas(lam)
        if self.output_rule is not None:  # every process enters its reduction (the global scope), replays included
            lambdas["safeguard/output_lambda"] = self.output_rule(branches.predictions, branches.window.contributes)
        return lambdas

    def lambda_of(self, branches: SeparatedBranches, optimizer: torch.optim.Optimizer | None) -> torch.Tensor:
        """``lambda`` from the branches' inner products (:meth:`ParameterSpaceBackward.lambda_of`)."""
        return self.backward_stage.lambda_of(branches)

    def _lambdas(self, lam: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"safeguard/lambda": lam}
