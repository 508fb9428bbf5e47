"""The exact rule in a step ``torch.compile`` captures: the per-branch passes of the tiny SD UNet compile without a
graph break (the tapped one pass breaks at its layers), their store keeps each branch's gradient bit for bit what a
separate ``torch.autograd.backward`` gives, a compiled trainer step equals the eager one, reads nothing more back to
the host than Diffusion-DPO's, and holds one gradient-sized buffer beyond Diffusion-DPO's ``.grad``."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from tests.helpers.host_reads import StepHostReads
from trl_diffusion_sdpo.objectives import PreferencePredictions
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients
from trl_diffusion_sdpo.safeguards.gradients.per_branch import BranchGradientSplitter
from trl_diffusion_sdpo.safeguards.parameter import loss_cotangents
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

PAIRS = 2
COMPILED = {"torch_compile": True, "torch_compile_backend": "aot_eager"}


def _unet(tmp_path) -> torch.nn.Module:
    unet = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizer")).unet
    return unet.train()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``2 * PAIRS`` latents (winners, then losers), timesteps and prompt embeddings for the tiny UNet."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2 * PAIRS, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (2 * PAIRS,), generator=generator)
    embeddings = torch.randn(2 * PAIRS, 6, 32, generator=generator)
    return sample, timesteps, embeddings


def _branch_loss(winner: torch.Tensor, loser: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A Diffusion-DPO-shaped loss of the two branches' predictions (each pair's weight needs both errors)."""
    e_w = (winner - target[:PAIRS]).pow(2).mean((1, 2, 3))
    e_l = (loser - target[PAIRS:]).pow(2).mean((1, 2, 3))
    return -torch.nn.functional.logsigmoid(-50.0 * (e_w - e_l)).mean()


def _per_branch_passes(unet, store, sample, timesteps, embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-branch passes as the stage runs them: both forwards, the cotangents, one backward per branch."""
    rows_w, rows_l = slice(0, PAIRS), slice(PAIRS, 2 * PAIRS)
    winner = unet(sample[rows_w], timesteps[rows_w], embeddings[rows_w]).sample
    loser = unet(sample[rows_l], timesteps[rows_l], embeddings[rows_l]).sample
    loss = _branch_loss(winner, loser, sample)
    predictions = PreferencePredictions(winner, loser, winner.detach(), loser.detach())
    cot_w, cot_l = loss_cotangents(loss, predictions, torch.ones(()), True)
    return store.backward_winner(winner, cot_w), store.backward_loser(loser, cot_l)


def _breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test compiles anew and counts its own graph breaks (a compiled run shared between tests resets them
    itself: :func:`_compiled_run`); afterwards dynamo's caches and the fake tensors its traces left are dropped, so
    that no later test's census of live tensors meets them."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    gc.collect()


# ---------------------------------------------------------------------------------------------- graph breaks


@pytest.mark.slow  # by default: test_a_compiled_step_equals_the_eager_per_branch_step (no graph break in its run)
def test_the_per_branch_passes_compile_whole(tmp_path, fresh_dynamo):
    """``fullgraph=True`` raises at the first graph break: the per-branch passes' forwards compile whole and their
    backwards run the compiled backward graph (the store's work is outside it, on the weights' gradients)."""
    unet = _unet(tmp_path)
    params = [p for p in unet.parameters() if p.requires_grad]
    sample, timesteps, embeddings = _inputs()
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    winner_sq, cross = _per_branch_passes(compiled, BranchGradientSplitter(params), sample, timesteps, embeddings)
    assert torch.isfinite(winner_sq) and winner_sq > 0 and torch.isfinite(cross)
    assert all(p.grad is not None for p in params)  # the compiled backward reached every weight
    assert _breaks() == 0 and counters["stats"]["unique_graphs"] >= 1


@pytest.mark.slow  # a record of why the compiled step runs the per-branch passes, not a guard
def test_the_tapped_one_pass_breaks_the_graph_at_its_layers(tmp_path, fresh_dynamo):
    """The tapped one pass, compiled without ``fullgraph``, breaks at its layers (an autograd Function whose backward
    writes the pass's dict)."""
    unet = _unet(tmp_path)
    params = [p for p in unet.parameters() if p.requires_grad]
    sample, timesteps, embeddings = _inputs()
    store = OnePassBranchGradients(unet, params)
    tapped = torch.compile(unet, backend="aot_eager")
    with store.split(2):
        out = tapped(sample, timesteps, embeddings).sample
        torch.autograd.backward((out[:PAIRS], out[PAIRS:]), (torch.ones_like(out[:PAIRS]),) * 2)
    assert _breaks() > 0, "the tapped one pass was expected to break the graph"
    print(f"tapped one pass: {_breaks()} graph breaks")


# ---------------------------------------------------------------------------------------------- exactness


def test_the_flat_store_keeps_each_branch_bit_for_bit_what_a_separate_backward_gives(tmp_path):
    """Two micro-batches (the first learns which weights a backward reaches, the second is the steady one): each
    branch's gradient equals a separate ``torch.autograd.backward`` of that branch alone bit for bit, and the
    combination is ``g_w + lambda * h_l`` bit for bit; the inner products are those of the separate gradients (float32
    blocks)."""
    unet = _unet(tmp_path)
    params = [p for p in unet.parameters() if p.requires_grad]
    store = BranchGradientSplitter(params)
    for seed in (1, 2):
        sample, timesteps, embeddings = _inputs(seed)
        rows_w, rows_l = slice(0, PAIRS), slice(PAIRS, 2 * PAIRS)
        separate = []
        winner = unet(sample[rows_w], timesteps[rows_w], embeddings[rows_w]).sample
        loser = unet(sample[rows_l], timesteps[rows_l], embeddings[rows_l]).sample
        predictions = PreferencePredictions(winner, loser, winner.detach(), loser.detach())
        cot_w, cot_l = loss_cotangents(_branch_loss(winner, loser, sample), predictions, torch.ones(()), True)
        for output, cotangent in ((winner, cot_w), (loser, cot_l)):
            for p in params:
                p.grad = None
            torch.autograd.backward(output, cotangent)
            separate.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
        winner_sq, cross = _per_branch_passes(unet, store, sample, timesteps, embeddings)
        g_w, h_l = store.branch_gradients()
        assert all(torch.equal(a, b) for a, b in zip(g_w, separate[0])), "the winner's gradient differs"
        assert all(torch.equal(a, b) for a, b in zip(h_l, separate[1])), "the loser's gradient differs"
        flat_w = torch.cat([g.reshape(-1) for g in separate[0]]).double()
        flat_l = torch.cat([g.reshape(-1) for g in separate[1]]).double()
        # float32 products summed in blocks, the blocks' sums in float64 (blocked_dot)
        torch.testing.assert_close(winner_sq.double(), flat_w @ flat_w, rtol=1e-5, atol=0)
        torch.testing.assert_close(cross.double(), flat_w @ flat_l, rtol=1e-5, atol=1e-6 * float(flat_w @ flat_w))
        lam = torch.tensor(0.375)
        store.combine(lam)
        assert all(torch.equal(p.grad, w + lam * h) for p, w, h in zip(params, *separate))


# ---------------------------------------------------------------------------------------------- the trainer's step


class _AtOptimizerStep(TrainerCallback):
    """The trainable weights' gradients as the optimizer is about to read them, at every step."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad])


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in float32 units in the last place between ``a`` and ``b``, element by element."""
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    as_int = lambda t: torch.where(t.view(torch.int32) < 0, -(t.view(torch.int32) & 0x7FFFFFFF), t.view(torch.int32))  # noqa: E731
    return int((as_int(a).long() - as_int(b).long()).abs().max())


def _step(make_trainer, steps: int = 2, **overrides) -> tuple[list[float], list[list[torch.Tensor]], object]:
    seen = _AtOptimizerStep()
    trainer = make_trainer(
        safeguard_space="parameter",
        safeguard_mu=0.5,
        max_steps=steps,
        proportion_empty_prompts=0.0,
        callbacks=[seen],
        **overrides,
    )
    trainer.train()
    return _logged_lambdas(trainer), seen.grads, trainer


def _logged_lambdas(trainer) -> list[float]:
    return [log["safeguard/lambda_mean"] for log in trainer.state.log_history if "safeguard/lambda_mean" in log]


PASSES_LOGGER = "trl_diffusion_sdpo.safeguards.parameter"


class _Said(logging.Handler):
    """The messages logged at ``WARNING`` or above while it is attached to the root logger, with
    :data:`PASSES_LOGGER` let down to ``WARNING``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        logger, root = logging.getLogger(PASSES_LOGGER), logging.getLogger()
        level = logger.level
        logger.setLevel(logging.WARNING)
        root.addHandler(self)
        try:
            yield
        finally:
            root.removeHandler(self)
            logger.setLevel(level)


@dataclasses.dataclass
class CompiledRun:
    """What the tests below read of one compiled two-step run (:func:`_compiled_run`)."""

    lambdas: list[float]  # the logged lambda_mean of each step
    grads: list[list[torch.Tensor]]  # the trainable weights' gradients as the optimizer read them, at each step
    said: list[str]  # the warnings logged, PASSES_LOGGER's among them
    one_pass_built: bool  # whether the backward stage built the one pass, and its reason for the per-branch passes
    two_pass_reason: str | None
    unique_graphs: int
    breaks: int
    reads: list[str]  # the host reads of the second optimizer step (see _compiled_run)


def _compiled_run(make_trainer, fresh: bool = True, **overrides) -> CompiledRun:
    """A compiled run of two optimizer steps (``safeguard_mu=0.5``, no empty prompts, a log at each step) from a fresh
    dynamo (``fresh=False``: from the graphs an earlier run compiled, where its guards hold), with the host reads of
    its second step counted (its first compiles and decides the passes), those inside the passes too: autograd runs a
    backward with no torch-function mode on, so the passes that Trainer's backward carries
    (:class:`~trl_diffusion_sdpo.safeguards.passes.PassesInStep`) re-enter the step's counter. The counter is on from
    the first step, so that the step counted runs the graphs that step compiled (dynamo guards on the torch-function
    modes: a counter switched on at the second step would compile the denoiser again there)."""
    if fresh:
        torch._dynamo.reset()
    counters.clear()
    seen, said = _AtOptimizerStep(), _Said()
    counted = StepHostReads(lambda step: True)
    trainer = make_trainer(
        safeguard_mu=0.5,
        max_steps=2,
        proportion_empty_prompts=0.0,
        callbacks=[seen, counted],
        **overrides,
        **COMPILED,
    )
    with said.attached(), counted.inside_carried_passes():
        trainer.train()
    stage = getattr(trainer.safeguard, "backward_stage", None)
    return CompiledRun(
        lambdas=_logged_lambdas(trainer),
        grads=seen.grads,
        said=said.messages,
        one_pass_built=getattr(stage, "one_pass", None) is not None,
        two_pass_reason=getattr(stage, "two_pass_reason", None),
        unique_graphs=counters["stats"]["unique_graphs"],
        breaks=_breaks(),
        reads=counted.reads[1],
    )


@pytest.fixture(scope="module")
def compiled_runs() -> dict[str, CompiledRun]:
    """The compiled runs by safeguard space, each made once per module by the first test that asks
    (:func:`compiled_run`): the compiled-equals-eager test and the host-read test read the same parameter-space run."""
    return {}


# Diffusion-DPO's compiled run, the host reads' yardstick, passes one pair a step: its denoiser then sees the rows
# each per-branch pass gives it (two), so it runs the graph the safeguard's run compiled just before it instead of
# compiling its own (dynamo keeps a graph across models of one architecture). What the step reads on the host does not
# grow with the batch: a read per row in Diffusion-DPO's step would only tighten the bound.
DPO_YARDSTICK = {"safeguard_space": "none", "per_device_train_batch_size": 1}


def compiled_run(compiled_runs: dict, make_trainer, space: str) -> CompiledRun:
    """The compiled run of ``space``; a safeguard space's run is followed at once, in the same dynamo, by
    Diffusion-DPO's (:data:`DPO_YARDSTICK`) if no test has made it yet (each test starts from a fresh dynamo:
    :func:`fresh_dynamo`)."""
    if space == "none":
        if space not in compiled_runs:
            compiled_runs[space] = _compiled_run(make_trainer, **DPO_YARDSTICK)
        return compiled_runs[space]
    if space not in compiled_runs:
        compiled_runs[space] = _compiled_run(make_trainer, safeguard_space=space)
        if "none" not in compiled_runs:
            compiled_runs["none"] = _compiled_run(make_trainer, fresh=False, **DPO_YARDSTICK)
    return compiled_runs[space]


def test_a_compiled_step_equals_the_eager_per_branch_step(make_trainer, compiled_runs, fresh_dynamo):
    """``torch_compile=True`` (backend ``aot_eager``) runs the per-branch passes through the compiled denoiser, says
    so once, and its ``lambda`` and gradients equal the eager per-branch passes' within 64 float32 ulps (the
    compiled graph may order a reduction differently); the optimizer steps keep the two runs together."""
    eager_lambdas, eager_grads, _ = _step(make_trainer, safeguard_passes="two")
    run = compiled_run(compiled_runs, make_trainer, "parameter")
    said = [message for message in run.said if "compiled" in message]
    assert len(said) == 1 and "per branch" in said[0], said
    assert not run.one_pass_built and "compiled" in run.two_pass_reason
    assert run.unique_graphs >= 1 and run.breaks == 0  # the passes ran through the compiled module
    assert len(run.lambdas) == len(eager_lambdas) == 2 and 0.0 < eager_lambdas[0] < 1.0  # the constraint binds
    assert run.lambdas == pytest.approx(eager_lambdas, rel=1e-5)
    print(f"compiled vs eager lambda: {run.lambdas} vs {eager_lambdas}")
    worst = max(_ulps(a, b) for step, eager in zip(run.grads, eager_grads) for a, b in zip(step, eager))
    print(f"compiled vs eager per-branch gradients: {worst} ulps at most")
    assert worst <= 64


# The update space compiled in the slow tier: its search's reads are counted eagerly by default
# (tests/safeguard/test_host_reads.py), and the compiled route it takes by
# test_a_compiled_update_space_on_one_process_takes_the_per_branch_passes below.
@pytest.mark.parametrize("space", ["parameter", pytest.param("update", marks=pytest.mark.slow)])
def test_a_compiled_step_reads_nothing_more_back_to_the_host_than_diffusion_dpo(make_trainer, compiled_runs, space):
    reads = compiled_run(compiled_runs, make_trainer, space).reads
    dpo = compiled_run(compiled_runs, make_trainer, "none").reads
    assert len(reads) <= len(dpo), (space, reads, dpo)


# The counter inside the carried passes, by default: test_host_reads.py's planted read in the two passes (eager), the
# same backward without a torch-function mode.
@pytest.mark.slow
def test_the_counter_sees_a_read_inside_the_carried_passes(make_trainer, monkeypatch):
    """Planted: ``<g_w, g_w>`` read on the host between the winner's and the loser's pass (inside Trainer's
    backward) is counted."""
    winner_pass = BranchGradientSplitter.backward_winner

    def reading(store, *args, **kwargs):
        winner_sq = winner_pass(store, *args, **kwargs)
        winner_sq.item()
        return winner_sq

    monkeypatch.setattr(BranchGradientSplitter, "backward_winner", reading)
    reads = _compiled_run(make_trainer, safeguard_space="parameter").reads
    assert any(read.startswith("item at " + __file__) for read in reads), reads


# ---------------------------------------------------------------------------------------------- memory


def _held(obj, found: dict[int, int], depth: int = 0) -> None:
    """The storages of every tensor ``obj`` holds in its attributes, lists, tuples and dicts: ``{data_ptr: bytes}``."""
    if isinstance(obj, torch.nn.Parameter):  # the weights themselves: not a buffer of the rule's
        return
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for item in obj:
            _held(item, found, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for item in obj.values():
            _held(item, found, depth + 1)
    elif depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        for item in vars(obj).values():
            _held(item, found, depth + 1)


def _census(params, store=None) -> int:
    """Bytes of the unique storages of the weights' ``.grad`` and of whatever ``store`` holds."""
    found: dict[int, int] = {}
    _held([p.grad for p in params if p.grad is not None], found)
    if store is not None:
        _held(store, found)
    return sum(found.values())


class _Census(TrainerCallback):
    def __init__(self, trainer) -> None:
        self.trainer, self.after_step = trainer, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        stage = getattr(self.trainer.safeguard, "backward_stage", None)
        params = [p for p in model.parameters() if p.requires_grad]
        self.after_step.append(_census(params, None if stage is None else stage.store))


# What the census reads (the weights' .grad and the store) is the same objects compiled or eager: the per-branch
# passes eagerly by default, compiled in the slow tier.
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_the_exact_rule_holds_one_gradient_sized_buffer_beyond_diffusion_dpo(
    make_trainer, fresh_dynamo, monkeypatch, compiled
):
    """At the step's end (before the optimizer reads the gradients) and at its peak (both branches' gradients held,
    after the loser's pass), the per-branch step's ``.grad`` and store hold at most one gradient-sized buffer more
    than Diffusion-DPO's ``.grad``."""
    peaks: list[int] = []
    loser_pass = BranchGradientSplitter.backward_loser

    def counted(store, outputs, cotangents):
        cross = loser_pass(store, outputs, cotangents)
        peaks.append(_census(store.parameters, store))
        return cross

    monkeypatch.setattr(BranchGradientSplitter, "backward_loser", counted)
    sizes = {}
    route = COMPILED if compiled else {"safeguard_passes": "two"}
    for name, overrides in (("none", {"safeguard_space": "none"}), ("parameter", {"safeguard_space": "parameter"})):
        trainer = make_trainer(max_steps=2, **overrides, **route)
        census = _Census(trainer)
        trainer.add_callback(census)
        trainer.train()
        sizes[name] = census.after_step
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    gradient_bytes = sum(p.numel() * p.element_size() for p in params)
    assert sizes["none"] == [gradient_bytes] * 2  # Diffusion-DPO: its .grad
    assert len(peaks) == 2
    print(f"census: Diffusion-DPO {sizes['none']}, the exact rule {sizes['parameter']} (end), {peaks} (peak)")
    for held in sizes["parameter"] + peaks:
        assert held - gradient_bytes <= gradient_bytes, (held, gradient_bytes)


def test_deepspeed_asks_its_engine_whether_it_runs_the_module_compiled():
    """DeepSpeed compiles its module in place (``engine.compile``), leaving no compiled wrapper for
    ``is_compiled_module`` to see: the collectives read the engine's ``is_compiled``; elsewhere the wrapper says."""
    from types import SimpleNamespace

    from trl_diffusion_sdpo.safeguards.gradients.collectives import BranchCollectives
    from trl_diffusion_sdpo.safeguards.gradients.deepspeed import DeepSpeedCollectives

    module = torch.nn.Linear(2, 2)
    for compiled in (False, True):
        collectives = object.__new__(DeepSpeedCollectives)
        engine = SimpleNamespace(is_compiled=compiled)
        collectives.engine = SimpleNamespace(
            accelerator=SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
        )
        assert collectives.runs_compiled(module) is compiled
    plain = object.__new__(BranchCollectives)
    assert not plain.runs_compiled(module) and plain.runs_compiled(torch.compile(module))


def test_a_compiled_update_space_on_one_process_takes_the_per_branch_passes(make_trainer, caplog):
    """Which passes the update space runs on a compiled denoiser: on one process, whose per-branch store can hold its
    branches, the per-branch passes (compiled whole), as the parameter space's; only collectives whose per-branch
    passes keep the winner's gradient inside the engine (DeepSpeed's) take the tapped one pass there. The decision
    alone, on a compiled policy: no step runs."""
    from trl_diffusion_sdpo.safeguards.parameter import OnePass, PerBranchPasses
    from trl_diffusion_sdpo.safeguards.passes import BackwardWindow

    routes = {}
    for per_branch_store in (True, False):
        trainer = make_trainer(safeguard_space="update", safeguard_mu=0.5)
        stage = trainer.safeguard.backward_stage
        assert stage.update_space and stage.collectives.two_pass_update_space  # one process's collectives
        stage.collectives.two_pass_update_space = per_branch_store  # False: as DeepSpeed's declare
        compiled = torch.compile(trainer.policy, backend="aot_eager")  # compiled lazily: nothing runs here
        with caplog.at_level("WARNING", logger="trl_diffusion_sdpo.safeguards.parameter"):
            routes[per_branch_store] = type(next(stage.passes(compiled, BackwardWindow()))), stage.two_pass_reason
    assert routes[True][0] is PerBranchPasses and "compiled" in routes[True][1]
    assert routes[False] == (OnePass, None)
