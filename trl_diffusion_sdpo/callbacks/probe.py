"""A probe of Diffusion-DPO's pathology on held-out pairs (``probe_steps``).

The training logs' ``delta/winner`` is measured on the training batch, at the step's random timesteps and noise, on
pairs the policy is being pushed on. The pathology (Fu et al., arXiv 2511.03317: the winner's own denoising error
climbing above the reference's while the preference margin grows) is a statement about pairs the policy has not
trained on. Every ``probe_steps`` optimizer steps, :class:`HeldOutProbe` evaluates the policy and the reference on a
small fixed set of held-out pairs (the first ``probe_pairs`` of the eval split when one is given, otherwise
``probe_pairs`` pairs held back from training by :func:`hold_back_pairs`) at fixed noise and timesteps, and reports

* ``probe/mse_policy_winner``, ``probe/mse_ref_winner``, ``probe/mse_policy_loser``, ``probe/mse_ref_loser``: the mean
  denoising errors;
* ``probe/delta_winner`` and ``probe/delta_loser``: the policy's error minus the reference's (the pathology: the
  first above 0);
* ``probe/implicit_acc``: the share of pairs whose winner the policy prefers more than the reference does
  (``(e_w - e_w_ref) - (e_l - e_l_ref) < 0``, ties counting half);
* ``probe/winner_rise_z``: the winner's error rise over the reference's in the probe's own units
  (:func:`winner_rise_z`): the mean of ``d = e_w - e_w_ref`` over the pairs and noise draws over its standard error
  there, which the alarm reads (:mod:`.rewind`) at any model's scale.

Each pair is noised ``probe_noise_draws`` times (draws of its own: the first is the one a single-draw probe makes), so
the figures are means over ``probe_pairs`` x ``probe_noise_draws`` readings.

Its draws come from a generator of its own, seeded from the run's ``seed`` and started afresh at every probe (as an
evaluation's), and it runs without autograd: the training draws, the data order and the weights are those of a run
without it. Under forward noising the noised pairs are the same at every probe, and so are the reference's errors on
them while the reference's weights stay as they are (frozen; a LoRA run's base, which training never changes): the
probe keeps them from its first probe and runs only the policy after it, with the same readings bit for bit, until the
trainer says the reference changed (online ``ref_update_steps``) or the pairs are replaced. Inversion noising depends
on the policy and reads the reference at every probe. Each process evaluates its share of the pairs; the sums are
reduced over processes before the metrics are formed, so every process reads the same figures. :class:`ProbeCallback`
runs it at the end of a step and publishes the reading (:attr:`ProbeCallback.last_reading`), which the probe's alarm
reads after it in the same event (:class:`~.probe_signal.ProbeSignal`; its actions, the rewind among them, in
:mod:`.rewind`), and puts the figures into the next training log in its own ``on_log``.

An online run's data are prompts: its trainer holds ``probe_pairs`` prompts back from them (or takes the first of the
eval prompts; :func:`trl_diffusion_sdpo.online.probe_pairs.hold_back_prompts`) and pairs each once, before training,
with the run's own generation from keyed draws of the probe's (:mod:`trl_diffusion_sdpo.online.probe_pairs`); the
probe then reads those pairs as it reads an offline run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback

from ..data.columns import prompt_column
from ..objectives import DenoisingErrors
from ..step.predictions import denoising_errors
from ..step.stages import MicroBatchDraws, MicroBatchStages, NoisedMicroBatch

__all__ = [
    "PROBE_METRICS",
    "HeldOutProbe",
    "ProbeCallback",
    "ProbePieces",
    "first_rows",
    "held_back_how",
    "held_back_seed",
    "hold_back_pairs",
    "hold_back_rows",
    "probe_for_trainer",
    "probe_seed",
    "stratified_draw",
    "winner_rise_z",
]

logger = logging.getLogger(__name__)

#: the metrics a probe logs
PROBE_METRICS = (
    "probe/mse_policy_winner",
    "probe/mse_ref_winner",
    "probe/mse_policy_loser",
    "probe/mse_ref_loser",
    "probe/delta_winner",
    "probe/delta_loser",
    "probe/implicit_acc",
    "probe/winner_rise_z",
)


def winner_rise_z(sum_d: float, sum_d2: float, count: float) -> float:
    """The winner's error rise over the reference's in units of its standard error, from the sums of the per-pair,
    per-draw differences ``d_ij = e_w(policy) - e_w(reference)`` over every process's pairs ``i`` and noise draws
    ``j`` (``sum_d = sum d_ij``, ``sum_d2 = sum d_ij**2``, ``count = n`` = pairs x draws)::

        z = mean(d) / (s / sqrt(n)),  mean(d) = sum_d / n,  s**2 = (sum_d2 - sum_d**2 / n) / (n - 1)

    (the one-sample t statistic of the ``d_ij`` against 0). ``nan`` with fewer than two readings (no spread to
    measure); with no spread at all (every ``d_ij`` equal, the policy still the reference), 0 where the mean is 0,
    else an infinity of the mean's sign."""
    n = float(count)
    if n < 2:
        return math.nan
    mean = sum_d / n
    variance = max(sum_d2 - sum_d * sum_d / n, 0.0) / (n - 1)
    if variance == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(variance / n)


def probe_seed(seed: int) -> int:
    """The seed of the probe's generator: derived from the run's ``seed`` under a key of its own, so its draws are
    neither the training's keyed draws nor an evaluation's."""
    digest = hashlib.blake2b(f"{seed}/probe".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def held_back_seed(args: Any) -> int:
    """The seed that draws the probe's held-back pairs: the config's ``probe_pairs_seed``, else its ``seed`` (the
    run's)."""
    chosen = getattr(args, "probe_pairs_seed", None)
    return args.seed if chosen is None else chosen


def hold_back_pairs(train_dataset: Any, eval_dataset: Any, args: Any) -> tuple[Any, Dataset | None]:
    """``(train_dataset, held)``: with the probe on and no ``eval_dataset``, ``probe_pairs`` rows of ``train_dataset``
    taken out of it as the probe's pairs: drawn at random with :func:`held_back_seed`, stratified by prompt where
    prompts repeat (:func:`hold_back_rows`); a streamed dataset's first rows (it cannot be drawn from at random
    without reading it whole). Otherwise ``train_dataset`` as given and ``None`` (the probe reads the eval split). The
    trainer calls it through :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.hold_back_probe_pairs`, which the online
    trainer overrides (its rows are prompts)."""
    if not getattr(args, "probe_steps", None) or eval_dataset is not None:
        return train_dataset, None
    if isinstance(train_dataset, IterableDataset):
        return hold_back_rows(train_dataset, args.probe_pairs)
    return hold_back_rows(train_dataset, args.probe_pairs, seed=held_back_seed(args))


def hold_back_rows(
    train_dataset: Any, count: int, rows: str = "rows", *, seed: int | None = None
) -> tuple[Any, Dataset]:
    """``(train_dataset without them, held)``: ``count`` rows of ``train_dataset`` held back, refused where too few
    would be left; ``rows`` names them in the errors. Without ``seed`` the last ``count`` rows (the first ones of a
    streamed dataset, which cannot be drawn from at random without reading it whole); with ``seed`` (a
    ``datasets.Dataset`` only) ``count`` rows drawn at random by :func:`stratified_draw`, stratified by prompt where
    prompts repeat, each part kept in the dataset's order. The held rows' ``info.description`` says how they were
    held back, which a probe built on them states in the start summary."""
    if isinstance(train_dataset, IterableDataset):
        if seed is not None:
            raise ValueError(
                "hold_back_rows(seed=...) draws rows of a datasets.Dataset; a streamed one gives its first"
            )
        held = list(train_dataset.take(count))
        if len(held) < count:
            raise ValueError(
                f"probe_pairs={count}: the streamed train_dataset holds only {len(held)} {rows}; lower probe_pairs "
                "or give an eval_dataset"
            )
        how = f"the stream's first {count} {rows}, not drawn at random: a draw over a stream would read it whole"
        return train_dataset.skip(count), _described(Dataset.from_list(held), how)
    if not isinstance(train_dataset, Dataset):
        raise ValueError(
            "probe_steps without an eval_dataset holds pairs back from a datasets.Dataset or IterableDataset; with "
            f"this train_dataset ({type(train_dataset).__name__}, e.g. a latent cache) give an eval_dataset for the "
            "probe"
        )
    if len(train_dataset) <= count:
        raise ValueError(
            f"probe_pairs={count} would hold back every one of the {len(train_dataset)} training {rows}: lower "
            "probe_pairs or give an eval_dataset"
        )
    if seed is None:
        keep = len(train_dataset) - count
        kept, held_rows, how = range(keep), range(keep, len(train_dataset)), f"its last {count} {rows}"
    else:
        prompts = _prompts(train_dataset)
        held_rows = stratified_draw(prompts if prompts is not None else range(len(train_dataset)), count, seed)
        chosen = set(held_rows)
        kept = [i for i in range(len(train_dataset)) if i not in chosen]
        how = f"drawn at random with seed {seed}"
        groups = len(set(prompts)) if prompts is not None else len(train_dataset)
        if groups < len(train_dataset):
            how += f", stratified over {groups} prompts"
    return train_dataset.select(kept), _described(train_dataset.select(held_rows), how)


def stratified_draw(keys: Sequence[Any], count: int, seed: int) -> list[int]:
    """``count`` of the indices of ``keys`` drawn at random, stratified by key, in increasing order; the same for the
    same ``keys``, ``count`` and ``seed``.

    Each group of equal keys (taken in the order of first appearance) gets its proportional share
    ``count * size / len(keys)``, rounded down, and the rows still to draw go one each to the groups with the largest
    remainders (Hamilton's rule; equal remainders in an order drawn by the generator), so every group holds the floor
    or the ceiling of its share. Within a group the rows are drawn without replacement. Where every key differs it is
    a plain draw of ``count`` rows without replacement."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    shares = [count * len(group) / len(keys) for group in members]
    taken = [math.floor(share) for share in shares]
    ties = rng.random(len(members))  # drawn before the rows: the groups' order does not depend on their draws
    by_remainder = sorted(range(len(members)), key=lambda g: (-(shares[g] - taken[g]), ties[g]))
    for g in by_remainder[: count - sum(taken)]:
        taken[g] += 1
    drawn = [int(i) for group, k in zip(members, taken, strict=True) for i in rng.choice(group, k, replace=False)]
    return sorted(drawn)


def _prompts(dataset: Dataset) -> list[Any] | None:
    """Each row's prompt (TRL's ``prompt`` column, else Pick-a-Pic's ``caption``) as a group key, or ``None`` where
    the dataset has neither."""
    column = prompt_column(dataset.column_names)
    if column is None:
        return None
    values = dataset.select_columns([column])[column]
    return [value if isinstance(value, str) else repr(value) for value in values]


_HELD_BACK = "held back from the training data ({})"


def _described(held: Dataset, how: str) -> Dataset:
    """``held`` with ``info.description`` saying how it was held back from the training data (``select`` and
    ``from_list`` give each dataset an info of its own: the training part's stays as it was)."""
    held.info.description = _HELD_BACK.format(how)
    return held


def held_back_how(held: Any) -> str:
    """How :func:`hold_back_rows` drew ``held`` (the words inside its description's parentheses: "drawn at random
    with seed 42", "its last 4 rows", ...); "how is not recorded" for rows held back elsewhere."""
    description = getattr(getattr(held, "info", None), "description", None) or ""
    before, _, after = _HELD_BACK.partition("{}")
    if description.startswith(before) and description.endswith(after):
        return description[len(before) : len(description) - len(after)]
    return "how is not recorded"


class HeldOutProbe:
    """The policy and the reference on this process's share of the held-out pairs, at the probe's fixed draws.

    Args:
        stages: the stages of a micro-batch with the probe's own :class:`MicroBatchDraws` (never the training's).
        batch: this process's pairs, collated and on the device (``None``: none; an online run's are generated after
            the probe is made, and set before training begins).
        seed: the probe generator's seed (:func:`probe_seed`); started afresh at every probe.
        reduce: sums a tensor over the processes (the identity on one).
        forward_context: the context the trainer runs a forward in (autocast).
        draws: the noise draws per pair (``probe_noise_draws``): each pair is noised this many times, one after
            another from the probe's generator.
        reference_key: what identifies the reference's weights now (the trainer's count of reference refreshes):
            the reference's errors on the probe's fixed noised pairs are kept from one probe to the next while it
            returns the same value. ``None``: the reference runs at every probe.
    """

    def __init__(
        self,
        stages: MicroBatchStages,
        batch: dict[str, torch.Tensor] | None,
        seed: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        draws: int = 1,
        reference_key: Callable[[], Hashable] | None = None,
    ) -> None:
        if draws < 1:
            raise ValueError(f"draws={draws}: the probe noises each pair 1 or more times")
        self.stages, self.batch, self.seed, self.draws = stages, batch, seed, draws
        self.reduce, self.forward_context, self.reference_key = reduce, forward_context, reference_key
        # Forward noising does not depend on the policy: the noised pairs are made once, at the first probe.
        self._reusable = not getattr(stages.noiser, "inverts", False)

    @property
    def batch(self) -> dict[str, torch.Tensor] | None:
        """This process's pairs; setting them drops what was kept of the previous ones."""
        return self._batch

    @batch.setter
    def batch(self, batch: dict[str, torch.Tensor] | None) -> None:
        self._batch = batch
        self._noised: list[NoisedMicroBatch] | None = None
        # (reference_key's value, per draw the reference's winner and loser errors) from the probe that ran it
        self._reference_errors: tuple[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def measure(self, policy: torch.nn.Module, device: torch.device | str) -> dict[str, float]:
        """The probe's metrics (:data:`PROBE_METRICS`) for ``policy`` as it is now, equal on every process."""
        sums = torch.zeros(8, dtype=torch.float64, device=device)
        if self.batch is not None:
            was_training = policy.training
            policy.eval()
            try:
                with torch.no_grad(), self.forward_context():
                    noised = self._noised if self._noised is not None else self._noise(policy)
                    if self._reusable:
                        self._noised = noised
                    errors = self._errors(policy, noised)
            finally:
                policy.train(was_training)
            sums = sum(self._sums(e) for e in errors).to(device)
        pw, rw, pl, rl, preferred, count, d, d2 = self.reduce(sums).tolist()  # one host read per probe
        if count == 0:
            raise RuntimeError("the probe's held-out pairs were all dropped by the collator: give other pairs")
        z = winner_rise_z(d, d2, count)
        pw, rw, pl, rl, preferred = (value / count for value in (pw, rw, pl, rl, preferred))
        values = (pw, rw, pl, rl, pw - rw, pl - rl, preferred, z)
        return dict(zip(PROBE_METRICS, values, strict=True))

    def _errors(self, policy: torch.nn.Module, noised: list[NoisedMicroBatch]) -> list[DenoisingErrors]:
        """Each draw's errors: the policy's from its forward now; the reference's kept from an earlier probe where
        the noised pairs are fixed and ``reference_key`` still reads the value they were kept under, else from its
        forward now (and kept for the next probe)."""
        key = self.reference_key() if self._reusable and self.reference_key is not None else None
        kept = self._reference_errors
        if key is not None and kept is not None and kept[0] == key:
            errors = []
            for pair, (winner, loser) in zip(noised, kept[1], strict=True):
                drawn = denoising_errors(self.stages.predict_noised(policy, pair, False, with_reference=False))
                drawn.reference_winner, drawn.reference_loser = winner, loser
                errors.append(drawn)
            return errors
        errors = [denoising_errors(self.stages.predict_noised(policy, pair, False)) for pair in noised]
        if key is not None:
            self._reference_errors = (key, [(e.reference_winner, e.reference_loser) for e in errors])
        return errors

    def _noise(self, policy: torch.nn.Module) -> list[NoisedMicroBatch]:
        """The pairs noised ``draws`` times, one draw after another from the probe's generator started afresh."""
        draws = self.stages.draws
        draws.start_evaluation(self.seed)
        try:
            return [self.stages.noised_pair(policy, self.batch, "eval", 0) for _ in range(self.draws)]
        finally:
            draws.end_evaluation()

    @staticmethod
    def _sums(errors: DenoisingErrors) -> torch.Tensor:
        """One draw's sums over this process's pairs: the four errors, the preferred count, the pairs, and the sums
        of ``d = e_w - e_w_ref`` and of ``d**2`` (:func:`winner_rise_z`)."""
        pw, rw = errors.policy_winner.double(), errors.reference_winner.double()
        pl, rl = errors.policy_loser.double(), errors.reference_loser.double()
        margin = (pw - rw) - (pl - rl)
        preferred = (margin < 0).double() + 0.5 * (margin == 0).double()
        count = torch.full((), float(pw.numel()), dtype=torch.float64, device=pw.device)
        d = pw - rw
        return torch.stack([pw.sum(), rw.sum(), pl.sum(), rl.sum(), preferred.sum(), count, d.sum(), (d * d).sum()])


class ProbeCallback(TrainerCallback):
    """Runs the probe every ``every`` optimizer steps, in ``on_step_end`` (after the optimizer's update), and publishes
    its reading: :attr:`last_reading` (``(step, figures)``, the figures reduced over processes) for the callbacks after
    it in that event (an :class:`~.alarm.AlarmCallback` with a :class:`~.probe_signal.ProbeSignal`), and its figures in
    the next training log, written in its own ``on_log`` into the ``logs`` and ``state.log_history[-1]``.

    Args:
        probe: the :class:`HeldOutProbe`.
        every: ``probe_steps``.
        policy: returns the trained denoiser, unwrapped.
        device: where the reduced sums live.
        source: where the pairs come from, for the start summary.
        held: the rows :func:`hold_back_pairs` took for the probe (an online run's prompts, which its trainer pairs).

    The trainer builds it from ``probe_steps``; a Python user builds one with :meth:`held_out` once the trainer is.
    """

    def __init__(
        self,
        probe: HeldOutProbe | None,
        every: int,
        policy: Callable[[], torch.nn.Module] | None,
        device: torch.device | str,
        source: str = "",
        held: Dataset | None = None,
    ) -> None:
        self.probe, self.every, self.policy, self.device = probe, every, policy, device
        self.source, self.held = source, held
        self.pending: dict[str, float] = {}  # the figures for the next training log, where none publishes them
        #: puts the figures into the next training log before transformers records it (the trainer's ``log_next``);
        #: ``None``: this callback writes them in its ``on_log``
        self.publish: Callable[[Mapping[str, float]], None] | None = None
        self.readings: list[tuple[int, dict[str, float]]] = []  # (step, metrics) of every probe of this process
        #: the module the probe runs, inside the block (the trainer's engine's :meth:`~.engines.Engine.probing`)
        self.probing: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]] = lambda: (
            contextlib.nullcontext(self.policy())
        )

    @classmethod
    def held_out(cls, every: int, pairs: Dataset | None = None, *, trainer: Any | None = None) -> ProbeCallback:
        """A probe built by hand in place of the config's ``probe_steps``, as TRL's ``LogCompletionsCallback(trainer,
        ...)`` is built, and added with ``trainer.add_callback(probe)``: every ``every`` optimizer steps on ``pairs``
        (preference pairs the training never sees, e.g. from :func:`hold_back_rows`), or on the eval split's first
        ``probe_pairs`` pairs where ``pairs`` is ``None``, with ``trainer``'s policy, reference and data
        (:func:`probe_for_trainer`, through its :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.probe_pieces`)."""
        if every < 1:
            raise ValueError(f"every={every}: a probe runs every 1 or more optimizer steps")
        if trainer is None:
            raise ValueError(
                "ProbeCallback.held_out runs the trainer's policy and reference: build it once the trainer is, "
                "ProbeCallback.held_out(every, pairs, trainer=trainer), and add it with trainer.add_callback(probe)"
            )
        count = trainer.args.probe_pairs if pairs is None else len(pairs)
        probe = probe_for_trainer(trainer, pairs, every=every, count=count)
        if pairs is not None:
            how = getattr(getattr(pairs, "info", None), "description", "") or ""
            how = f", {how}" if how.startswith("held back") else ""
            probe.source = f"{count} pairs passed to its ProbeCallback{how}"
        return probe

    @property
    def last_reading(self) -> tuple[int, dict[str, float]] | None:
        """The latest probe's ``(step, figures)``, the figures (:data:`PROBE_METRICS`) equal on every process;
        ``None`` before the first."""
        return self.readings[-1] if self.readings else None

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every:
            return
        with self.probing() as model:  # the engine's own forward: sharded weights are gathered in it
            metrics = self.probe.measure(model, self.device)
        self.readings.append((step, metrics))
        if self.publish is not None:  # a log after several probes carries the last one's figures
            self.publish(metrics)
        else:
            self.pending = dict(metrics)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # a training log (a step's, with its loss, or the run's last), never an evaluation's
        if logs is None or not self.pending or not ("loss" in logs or "train_loss" in logs):
            return
        figures, self.pending = self.pending, {}
        logs.update(figures)  # the callbacks after this one (the console's) see the figures
        if state.log_history:
            state.log_history[-1].update(figures)  # the entry transformers recorded for this log

    def summary(self) -> str:
        """The start summary's line: what is probed, from where."""
        draws = self.probe.draws if self.probe is not None else 1
        return f"held-out probe every {self.every} optimizer steps on {self.source}, {draws} noise draws per pair"


@dataclass(frozen=True)
class ProbePieces:
    """What a probe reads of the trainer it probes, handed to it in one piece
    (:meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.probe_pieces`, built there in one place): the probe reads
    these, the trainer's ``args`` and, for its alarm, what docs/compose.md lists; no other attribute of the trainer.

    Attributes:
        stages: the predict function: ``stages(draws)`` is a micro-batch's stages (noising, the policy's and the
            reference's predictions) on the probe's own ``draws``.
        collate: ``collate(held)`` is ``(dataset, collator)``: the held-back pairs prepared as the run's evaluation
            data is (``held``), or the eval split and its collator (``None``); the collator turns rows into a batch.
        place: a collated batch on the device, as the trainer places its inputs.
        reduce: sums a tensor over the processes (the identity on one).
        forward_context: the context the trainer runs a forward in (autocast).
        probing: the module the probe runs, inside the block (the engine's own forward).
        policy: the trained denoiser, unwrapped.
        process_index: this process's index.
        num_processes: the number of processes.
        rows_are_prompts: the held-out rows are prompts, paired by the trainer once it is built (the online trainer).
        has_reference: whether the objective runs a reference, which the probe compares the policy with.
        engine: the engine's name (the probe refuses FSDP1's flattened shards).
        publish: ``publish(figures)`` puts the probe's figures into the next training log (the trainer's
            :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.log_next`), where the ``report_to`` integrations get them.
        reference_key: what identifies the reference's weights now (:class:`HeldOutProbe`'s ``reference_key``);
            ``None``: the probe runs the reference at every probe.
    """

    stages: Callable[[MicroBatchDraws], MicroBatchStages]
    collate: Callable[[Dataset | None], tuple[Any, Callable[[list[dict[str, Any]]], dict[str, Any]]]]
    place: Callable[[dict[str, Any]], dict[str, Any]]
    reduce: Callable[[torch.Tensor], torch.Tensor]
    forward_context: Callable[[], contextlib.AbstractContextManager]
    probing: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]]
    policy: Callable[[], torch.nn.Module]
    process_index: int
    num_processes: int
    rows_are_prompts: bool
    has_reference: bool
    engine: str
    publish: Callable[[Mapping[str, float]], None] | None = None
    reference_key: Callable[[], Hashable] | None = None


def _probe_batch(pieces: ProbePieces, held: Dataset | None, count: int) -> dict[str, torch.Tensor] | None:
    """This process's share of the held-out pairs, collated as an evaluation's and placed on the device."""
    dataset, collator = pieces.collate(held)
    rows = first_rows(dataset, count)
    share = len(rows) // pieces.num_processes
    if share == 0:
        raise ValueError(
            f"the probe has {len(rows)} held-out pairs for {pieces.num_processes} processes: set probe_pairs to "
            "at least the number of processes"
        )
    mine = rows[pieces.process_index * share : (pieces.process_index + 1) * share]
    return pieces.place(collator(mine))


def first_rows(dataset: Any, count: int) -> list[dict[str, Any]]:
    """The first ``count`` rows of ``dataset`` (all of them where it holds fewer), streamed or not."""
    if isinstance(dataset, IterableDataset):
        return list(dataset.take(count))
    return [dataset[i] for i in range(min(count, len(dataset)))]


def probe_for_trainer(
    trainer: Any, held: Dataset | None, every: int | None = None, count: int | None = None
) -> ProbeCallback | None:
    """The probe every ``every`` optimizer steps (``probe_steps`` by default; ``None``: off) on ``count`` held-out
    pairs (``probe_pairs``); ``held``: the pairs held back from the
    training data (``None``: the eval split's)."""
    args = trainer.args
    every = every or args.probe_steps
    if not every:
        return None
    count = count or args.probe_pairs
    pieces: ProbePieces = trainer.probe_pieces()
    if not pieces.has_reference:
        raise ValueError(f"probe_steps compares the policy with the reference; loss_type={args.loss_type!r} has none")
    if pieces.engine == "fsdp1":
        raise ValueError(
            "probe_steps runs the policy on each process's pairs under the engine's own forward, which is not wired "
            "for FSDP1's flattened shards: train with FSDP2 (fsdp2.yaml), DeepSpeed, DDP or one process, or unset "
            "probe_steps"
        )
    share = max(1, count // pieces.num_processes)
    draws = MicroBatchDraws(probe_seed(args.seed), share, share, pieces.process_index, pieces.num_processes,
                            args.device)  # fmt: skip
    prompts = pieces.rows_are_prompts  # paired by the trainer once it is built (the online trainer)
    probe = HeldOutProbe(
        pieces.stages(draws),
        None if prompts else _probe_batch(pieces, held, count),
        probe_seed(args.seed),
        pieces.reduce,
        pieces.forward_context,
        draws=args.probe_noise_draws,
        reference_key=pieces.reference_key,
    )
    # how the pairs were held back (hold_back_rows describes them), or the eval split's
    how = (held.info.description or "held back from the training data") if held is not None else None
    source = f"{count} pairs {how}" if how is not None else f"the eval split's first {count} pairs"
    if prompts:
        source = ""  # the online trainer states its prompts and how they were paired once it has paired them
    callback = ProbeCallback(probe, every, pieces.policy, args.device, source, held)
    callback.probing, callback.publish = pieces.probing, pieces.publish
    return callback
