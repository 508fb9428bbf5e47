"""Per-layer gradient taps: each trainable weight's gradient split by groups of batch rows, inside one backward pass.

The exact safeguard needs the winner's and the loser's share of every trainable weight's gradient. The batch's rows
are independent samples (no layer of a denoiser mixes samples), so one forward pass over ``[winners; losers]`` and
one backward pass already give every layer the right output gradient on every row; only a weight gradient's sum over
rows mixes the two branches. A tap computes that sum per group of rows instead, from the layer's saved input and its
output gradient, as per-sample-gradient libraries do (Opacus' grad samplers), with two groups (the branches) or
``2B`` (one per image: the per-pair scope)::

    Linear:  dW_k = sum_{r in group k} g_r x_r^T,  db_k = sum_{r in group k} g_r      (one batched matmul, one sum)
    ConvNd:  dx over all rows in one convolution_backward call; dW_k, db_k in one call per group of rows
    LayerNorm, GroupNorm: dx_k, dgamma_k, dbeta_k = aten's native backward over group k's rows, its statistics
             recomputed there                                                          (two calls per group)
    other norms, embeddings (leaf modules of the types in :data:`RECOMPUTED`): the layer's forward recomputed per
             group under autograd (elementwise work, small against the matmuls)

The group sums together are what autograd's one sum would be: FLOPs equal to one weight gradient's, no second pass
through the network. Each tapped layer writes its weights' per-group gradients (``[groups, *weight.shape]``) in one
batched operation into the view the caller's ``destination`` offers for each weight (the first gradient of the pass
overwrites it, any later one adds to it), or hands them to a sink (``sink(index, per_group)``) where it offers none,
and returns none to autograd, so ``.grad`` is not touched by the pass.

The taps are module hooks, installed once per run (when :meth:`LayerTaps.tapping` is first entered, or by
:meth:`LayerTaps.install`) and removed by :meth:`LayerTaps.close` or when the :class:`LayerTaps` is garbage-collected;
a pass only switches the current pass on and off (one assignment each way, nothing per layer). While a pass is on, a
forward pre-hook runs the layer's own forward without autograd (as an autograd function's forward runs), and a
forward hook (run before any other library's) hands its output to autograd through the tap's function, which keeps
the input for the backward. With no pass on, under ``torch.no_grad`` (evaluation) or on rows a layer cannot group,
the hooks return at once and the layer computes and records exactly what it would without them. A tap's work in the
backward is a fixed number of operations per layer (a linear layer's: five with a bias), whatever its shape, with no
per-parameter views or copies: what a layer needs (its weights' indices, a convolution's arguments, resolved aten
overloads) is looked up when it is built, and the views it writes into are asked of ``destination`` once per pass and
kept in one table of the pass (not per layer).

Under autocast the forward casts what an untapped layer's does: the pre-hook casts a linear or convolution layer's
input to autocast's dtype (autocast then leaves it as it is), the layer casts its weights, and the tap keeps
the weights as the layer holds them; its backward casts a weight to the output gradient's dtype where they differ
(one cast per linear or convolution layer), so no second copy of a weight is held from the forward to the backward.
A norm's input is kept as the layer received it and cast in the backward to the dtype the layer computed in (its
output's: float32 under CUDA's autocast, the input's under the CPU's).

Rows are grouped as the layer sees them: the first ``1/groups`` of the leading dimension is group 0, and so on, which
holds when the leading dimension is the batch or the batch times a per-sample axis (tokens, pixels, frames), as in
every family's denoiser (checked against per-branch passes for each in ``tests/safeguard/test_one_pass_safeguard.py``).

A trainable parameter that no tap covers (one held by a module that is not a leaf of a tapped type, as Wan's
``scale_shift_table``, or a peft variant such as DoRA's magnitude vector) is listed by :attr:`LayerTaps.uncovered`; a
layer called on rows it cannot group (no leading dimension divisible by ``groups``) records why in
:attr:`LayerTaps.failures` and computes its output as usual. The caller falls back to per-branch passes then.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["RECOMPUTED", "Destination", "LayerTaps", "Sink"]

Sink = Callable[[int, torch.Tensor], None]
# index -> the ``[groups, *weight.shape]`` view weight ``index``'s per-group gradients are written into, or None (sink)
Destination = Callable[[int], "torch.Tensor | None"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_GROUP_NORM = torch.ops.aten.native_group_norm.default
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default
_LAYER_NORM = torch.ops.aten.native_layer_norm.default
_LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default


def _recomputed_types() -> tuple[type[nn.Module], ...]:
    """Leaf modules whose trainable weights are tapped by recomputing their forward per group: one tensor in, one
    tensor out, rows independent (norm affines, embeddings), from torch and diffusers."""
    types: list[type[nn.Module]] = [nn.LayerNorm, nn.GroupNorm, nn.Embedding]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    try:
        from diffusers.models import normalization
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return tuple(types)
    for name in ("RMSNorm", "FP32LayerNorm", "LayerNorm"):
        if isinstance(getattr(normalization, name, None), type):
            types.append(getattr(normalization, name))
    return tuple(types)


RECOMPUTED: tuple[type[nn.Module], ...] = _recomputed_types()


def _kind(module: nn.Module) -> str | None:
    """How a module's own weights are tapped: ``"linear"``, ``"conv"``, ``"norm"``, ``"recompute"``, or ``None`` (not
    covered)."""
    if next(module.children(), None) is not None:
        return None
    forward = type(module).forward
    if isinstance(module, nn.Linear) and forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, _CONVS) and forward in (c.forward for c in _CONVS):
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return "conv"
        return "recompute"
    if type(module) in (nn.LayerNorm, nn.GroupNorm) and getattr(module, "weight", None) is not None:
        return "norm"
    if isinstance(module, RECOMPUTED):
        return "recompute"
    return None


class _Pass:
    """What the layers of one tapped pass share: the number of row groups, where the gradients go, and per weight the
    view it writes into (asked of ``destination`` once) and whether the pass wrote it yet; the failures."""

    __slots__ = ("groups", "sink", "destination", "views", "written", "failures")

    def __init__(self, groups: int, sink: Sink | None, destination: Destination | None) -> None:
        self.groups, self.sink, self.destination = groups, sink, destination
        self.views: dict[int, torch.Tensor | None] = {}
        self.written: set[int] = set()
        self.failures: list[str] = []

    def view(self, index: int, layer: _Layer) -> torch.Tensor | None:
        """Weight ``index``'s view for this pass (asked of ``destination`` when the backward first reaches it: a store
        may allocate it then, after the forward), or None: its gradient goes to the sink."""
        views = self.views
        if index in views:
            return views[index]
        view = self.destination(index) if self.destination is not None else None
        if view is None and self.sink is None:
            layer.refuse()
        views[index] = view
        return view

    def target(self, index: int, dtype: torch.dtype, layer: _Layer) -> torch.Tensor | None:
        """The view to overwrite with weight ``index``'s per-group gradient, where this is its first of the pass
        and ``dtype`` is the view's (then marked written); else ``None``: hand the gradient to :meth:`deliver`."""
        view = self.view(index, layer)
        if view is None or index in self.written or view.dtype != dtype:
            return None
        self.written.add(index)
        return view

    def deliver(self, index: int, per_group: torch.Tensor, layer: _Layer) -> None:
        """Weight ``index``'s per-group gradient computed apart: copied into its view (added, after the first), or
        handed to the sink where there is no view."""
        view = self.view(index, layer)
        if view is None:
            self.sink(index, per_group)
        elif index in self.written:
            view.add_(per_group)
        else:
            view.copy_(per_group)
            self.written.add(index)

    def stack(self, index: int, per_group: list[torch.Tensor], layer: _Layer) -> None:
        """Weight ``index``'s per-group gradients (one tensor per group) stacked straight into its view where it
        can be (one operation), else handed to :meth:`deliver`."""
        into = self.target(index, per_group[0].dtype, layer)
        if into is None:
            self.deliver(index, torch.stack(per_group), layer)
        else:
            torch.stack(per_group, out=into)


class _Layer:
    """One tapped module and what its taps need, looked up once: its weights' indices in the caller's parameter list
    (``slots``: ``(attribute, index)``), a convolution's arguments."""

    __slots__ = ("name", "module", "kind", "slots", "weight", "bias", "conv_args")

    def __init__(self, name: str, module: nn.Module, kind: str, indices: dict[str, int]) -> None:
        self.name, self.module, self.kind = name, module, kind
        self.slots = list(indices.items())
        self.weight = indices.get("weight")  # the index of the module's ``weight`` (None: frozen or absent)
        self.bias = indices.get("bias")
        self.conv_args = None
        if kind == "conv":  # convolution_backward's arguments after the weight's sizes
            spatial = len(module.stride)
            args = (module.stride, module.padding, module.dilation, False, (0,) * spatial, module.groups)
            self.conv_args = tuple(tuple(a) if isinstance(a, list) else a for a in args)

    def refuse(self) -> None:
        where = self.name or type(self.module).__name__
        raise ValueError(f"{where}: a weight has no view to write its gradient into and no sink was given")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``: itself where it already is (no operation), else a cast."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class _LinearTap(torch.autograd.Function):
    """The layer's output as its own forward computed it (``computed``: ``(output,)``, made without autograd); the
    backward: the input gradient over all rows, the weight's per-group gradients in one batched matmul and the
    bias's in one sum, each written into its view.

    ``x`` is the input the layer computed with (under autocast, cast by the pre-hook); ``weight`` the layer's own
    (under autocast, in float32 where the layer's forward read a cast of it): the backward casts it to the output
    gradient's dtype for the input gradient, so the forward keeps no second copy of it."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, tap: _Pass, computed: tuple[torch.Tensor]):
        ctx.layer, ctx.tap, ctx.has_bias = layer, tap, bias is not None
        ctx.save_for_backward(x, weight)
        return computed[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        layer, tap = ctx.layer, ctx.tap
        grad_x = grad.matmul(_as(weight, grad.dtype)) if ctx.needs_input_grad[0] else None
        per_group_g_t = _grouped_transposed(grad, tap.groups)  # [groups, out, rows]
        index = layer.weight
        if index is not None:
            per_group_x = x.reshape(tap.groups, -1, x.shape[-1])
            into = tap.target(index, grad.dtype, layer)  # the batched matmul writes straight into the split buffer
            if into is None:
                tap.deliver(index, torch.bmm(per_group_g_t, per_group_x), layer)
            else:
                torch.bmm(per_group_g_t, per_group_x, out=into)
        if ctx.has_bias and layer.bias is not None:
            into = tap.target(layer.bias, grad.dtype, layer)
            if into is None:
                tap.deliver(layer.bias, per_group_g_t.sum(2), layer)
            else:
                torch.sum(per_group_g_t, 2, out=into)
        return grad_x, None, None, None, None, None


def _grouped_transposed(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """``grad`` (``[..., out]``, rows leading) as ``[groups, out, rows of the group]``: a view, made by one
    operation where ``grad`` is contiguous (its strides are then known), else by a reshape and a transpose."""
    out = grad.shape[-1]
    if grad.is_contiguous():
        rows = grad.numel() // (groups * out)
        return torch.as_strided(grad, (groups, out, rows), (rows * out, 1, out))
    return grad.reshape(groups, -1, out).mT


class _ConvTap(torch.autograd.Function):
    """As :class:`_LinearTap` for a convolution (the weight cast in the backward as there): one
    ``convolution_backward`` call gives the input gradient over all rows (each row's its own, as a call per group
    would give it), and per group of rows one call gives that group's weight and bias gradients (the calls together:
    the FLOPs of one over all rows), stacked into their views. A backward computes the input and the weight gradients
    apart anyway: this is one input-gradient computation instead of one per group, and no join of the groups' parts.
    (One grouped convolution over the groups of rows laid side by side as channels would give every group's weight
    gradient in one call, but oneDNN sums a grouped 1x1 or few-channel convolution's weight gradient in another order:
    its bf16 gradients differ from the per-branch passes' in their last bits.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, tap: _Pass, computed: tuple[torch.Tensor]):
        ctx.layer, ctx.tap, ctx.has_bias = layer, tap, bias is not None
        ctx.save_for_backward(x, weight)
        return computed[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        layer, tap = ctx.layer, ctx.tap
        want_w, want_b = layer.weight is not None, ctx.has_bias and layer.bias is not None
        needs_x = ctx.needs_input_grad[0]
        weight = _as(weight, grad.dtype)  # as for a linear layer: the dtype the layer computed in
        grad_x = None
        if needs_x:
            grad_x = _CONV_BACKWARD(grad, x, weight, None, *layer.conv_args, (True, False, False))[0]
        if want_w or want_b:
            mask = (False, want_w, want_b)
            bias_sizes = [weight.shape[0]] if want_b else None
            parts = [
                _CONV_BACKWARD(g, xs, weight, bias_sizes, *layer.conv_args, mask)
                for g, xs in zip(grad.chunk(tap.groups), x.chunk(tap.groups))
            ]
            if want_w:
                tap.stack(layer.weight, [part[1] for part in parts], layer)
            if want_b:
                tap.stack(layer.bias, [part[2] for part in parts], layer)
        return grad_x, None, None, None, None, None


class _NormTap(torch.autograd.Function):
    """LayerNorm and GroupNorm: per group of rows, the statistics recomputed by aten's native forward (they are per
    row: the same as the layer's own) and its native backward for that group's input and affine gradients; the input
    gradients joined, the affine ones stacked into their views."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, tap: _Pass, computed: tuple[torch.Tensor]):
        ctx.layer, ctx.tap, ctx.has_bias = layer, tap, bias is not None
        ctx.save_for_backward(x, weight, bias)
        return computed[0]

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        layer, tap = ctx.layer, ctx.tap
        module = layer.module
        # The dtype the layer computed in is its output's (a norm's output is its input's dtype, the affine weights
        # may be wider): autocast's float32 policy for norms (CUDA's) cast the input and the weights to it; the
        # input is kept as the layer received it and cast here, so the forward keeps no second, wider copy
        dtype = grad.dtype
        x = _as(x, dtype)
        if dtype == torch.float32:
            weight = _as(weight, dtype) if weight is not None else None
            bias = _as(bias, dtype) if bias is not None else None
        want_w, want_b = layer.weight is not None, ctx.has_bias and layer.bias is not None
        needs_x = ctx.needs_input_grad[0]
        mask = (needs_x, want_w, want_b)
        grad = grad if grad.is_contiguous() else grad.contiguous()
        if isinstance(module, nn.GroupNorm):
            # the statistics from the input in the layout F.group_norm hands aten's kernel (a channels-last input
            # stays channels-last, whose kernel sums in another order): the layer's own; its backward reads NCHW
            layout = _group_norm_layout(x)
            x = x if x.is_contiguous(memory_format=layout) else x.contiguous(memory_format=layout)
        rows = x.chunk(tap.groups)
        dense = rows if x.is_contiguous() else x.contiguous().chunk(tap.groups)
        parts = []
        for g, xs, ds in zip(grad.chunk(tap.groups), rows, dense):
            if isinstance(module, nn.GroupNorm):
                n, c = xs.shape[:2]
                hw = xs.numel() // max(n * c, 1)
                _, mean, rstd = _GROUP_NORM(xs, weight, bias, n, c, hw, module.num_groups, module.eps)
                parts.append(_GROUP_NORM_BACKWARD(g, ds, mean, rstd, weight, n, c, hw, module.num_groups, mask))
            else:
                shape = module.normalized_shape
                _, mean, rstd = _LAYER_NORM(xs, shape, weight, bias, module.eps)
                parts.append(_LAYER_NORM_BACKWARD(g, ds, shape, mean, rstd, weight, bias, mask))
        if want_w:
            tap.stack(layer.weight, [part[1] for part in parts], layer)
        if want_b:
            tap.stack(layer.bias, [part[2] for part in parts], layer)
        grad_x = torch.cat([part[0] for part in parts]) if needs_x else None
        return grad_x, None, None, None, None, None


def _group_norm_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout aten's group norm reads ``x`` in (its ``suggest_memory_format``): channels-last where ``x`` is dense
    channels-last and not also NCHW-contiguous, else NCHW."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


class _RecomputeTap(torch.autograd.Function):
    """The layer's output as its own forward computed it; the backward recomputes that forward per group of rows
    under autograd."""

    @staticmethod
    def forward(ctx, x, layer: _Layer, tap: _Pass, computed: tuple[torch.Tensor], autocast, *weights):
        ctx.layer, ctx.tap, ctx.autocast = layer, tap, autocast
        ctx.save_for_backward(x)
        return computed[0]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        layer, tap = ctx.layer, ctx.tap
        weights = [getattr(layer.module, name) for name, _ in layer.slots]
        needs_x = ctx.needs_input_grad[0]
        autocast = (
            torch.autocast(x.device.type, dtype=ctx.autocast) if ctx.autocast is not None else contextlib.nullcontext()
        )
        grads_x, per_weight = [], [[] for _ in weights]
        with torch.enable_grad(), autocast:
            for g, xs in zip(grad.chunk(tap.groups), x.chunk(tap.groups)):
                xs = xs.detach().requires_grad_(needs_x)
                out = layer.module.forward(xs)  # the layer's own forward, not its call: no hook taps it again
                inputs = ([xs] if needs_x else []) + weights
                found = torch.autograd.grad(out, inputs, g, allow_unused=True)
                if needs_x:
                    grads_x.append(found[0])
                    found = found[1:]
                for i, (w, dw) in enumerate(zip(weights, found)):
                    per_weight[i].append(torch.zeros_like(w) if dw is None else dw)
        for (_, index), dws in zip(layer.slots, per_weight):
            tap.deliver(index, torch.stack(dws), layer)
        grad_x = torch.cat(grads_x) if needs_x else None
        return (grad_x, None, None, None, None) + (None,) * len(weights)


_FUNCTIONS = {"linear": _LinearTap, "conv": _ConvTap, "norm": _NormTap}


class _Current:
    """The pass the taps of one :class:`LayerTaps` write to (``None`` outside :meth:`LayerTaps.tapping`), and the
    layer between its pre-hook and its hook (tapped layers are leaves: at most one at a time)."""

    __slots__ = ("tap", "pending")

    def __init__(self) -> None:
        self.tap: _Pass | None = None
        self.pending: _Layer | None = None


def _refusal(layer: _Layer, tap: _Pass, args: tuple, kwargs: dict) -> str:
    """Why this call cannot be tapped: not one tensor input whose leading dimension splits into the pass's groups of
    rows."""
    if len(args) != 1 or kwargs:
        return (
            f"{layer.name} was called with {len(args)} positional and {len(kwargs)} keyword arguments (a tap takes "
            "one input)"
        )
    x = args[0]
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    return (
        f"{layer.name} saw an input of shape {shape}, whose leading dimension does not split into {tap.groups} "
        "groups of rows"
    )


def _hooks(layer: _Layer, current: _Current) -> tuple[Callable, Callable]:
    """The forward pre-hook and forward hook that tap ``layer`` while ``current`` has a pass (else they return at
    once: the layer computes as it would without them)."""
    module = layer.module
    recompute = layer.kind == "recompute"
    apply = None if recompute else _FUNCTIONS[layer.kind].apply
    # linear and convolution layers run in autocast's lower precision on every device: their input is cast once, by
    # the pre-hook, and the layer's own forward and the tap's backward both read that cast
    casts_input = layer.kind in ("linear", "conv")
    names = [name for name, _ in layer.slots]
    is_grad_enabled, is_autocast_enabled, set_grad_enabled = (
        torch.is_grad_enabled,
        torch.is_autocast_enabled,
        torch.set_grad_enabled,
    )
    tensor = torch.Tensor

    def before(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        tap = current.tap
        if tap is None or not is_grad_enabled():
            return None
        x = args[0] if len(args) == 1 and not kwargs else None
        if not (isinstance(x, tensor) and x.dim() and x.shape[0] >= tap.groups and not x.shape[0] % tap.groups):
            tap.failures.append(_refusal(layer, tap, args, kwargs))
            return None
        changed = None
        if casts_input and x.is_floating_point() and is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            if x.dtype != dtype and x.dtype != torch.float64:  # what autocast casts (it leaves float64 alone)
                changed = ((x.to(dtype),), kwargs)  # recorded by autograd: the cast's backward reaches x
        # the layer's own forward without autograd, as an autograd function's forward runs: the tap's function
        # records the output instead (after), and autograd keeps nothing of the layer's own
        current.pending = layer
        set_grad_enabled(False)
        return changed

    def after(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if current.pending is not layer:
            return None
        current.pending = None
        set_grad_enabled(True)
        tap, x = current.tap, args[0]
        if recompute:
            weights = [getattr(module, name) for name in names]
            return _RecomputeTap.apply(x, layer, tap, (output,), _autocast_dtype(x), *weights)
        # the weights as the layer holds them: a backward casts them where the layer computed in another dtype
        return apply(x, module.weight, module.bias, layer, tap, (output,))

    return before, after


def _remove(handles: list) -> None:
    """Remove the hooks of ``handles`` (the taps closed or garbage-collected)."""
    for handle in handles:
        handle.remove()
    handles.clear()


class LayerTaps:
    """The taps over ``module`` for the trainable ``parameters`` (indices into that list go to the sink).

    Build once per run; the taps (module hooks) are installed when :meth:`tapping` is first entered (or by
    :meth:`install`) and stay until :meth:`close` (or until this object is garbage-collected). :meth:`tapping` runs
    one forward and backward pass tapped; outside it the hooks do nothing.
    """

    def __init__(self, module: nn.Module, parameters: Sequence[nn.Parameter]) -> None:
        index = {id(p): i for i, p in enumerate(parameters)}
        names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
        covered: set[int] = set()
        self.layers: list[_Layer] = []
        for name, child in module.named_modules():
            own = {n: index[id(p)] for n, p in child.named_parameters(recurse=False) if id(p) in index}
            kind = _kind(child) if own else None
            if kind is None:
                continue
            self.layers.append(_Layer(name, child, kind, own))
            covered.update(own.values())
        #: each trainable parameter's name in ``module``
        self.names = [names.get(id(p), f"parameter {i}") for i, p in enumerate(parameters)]
        #: names of the trainable parameters no tap covers (empty: every gradient can be split)
        self.uncovered = [name for i, name in enumerate(self.names) if i not in covered]
        self._current = _Current()
        self._handles: list = []
        self._closer: weakref.finalize | None = None
        self._last = _Pass(0, None, None)  # the current or last pass

    @property
    def installed(self) -> bool:
        """Whether the taps' hooks are registered on the layers."""
        return bool(self._handles)

    def install(self) -> None:
        """Register the taps' hooks (once: nothing where they are already): the pre-hook after every other library's
        registered so far (DeepSpeed ZeRO-3's and FSDP2's gather the weights), the hook before theirs (they hook the
        backward on the output autograd records). Removed by :meth:`close` or when this object is collected."""
        if self._handles or not self.layers:
            return
        handles = self._handles
        for layer in self.layers:
            before, after = _hooks(layer, self._current)
            handles.append(layer.module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(layer.module.register_forward_hook(after, prepend=True))
        self._closer = weakref.finalize(self, _remove, handles)

    def close(self) -> None:
        """Remove the taps' hooks (a later :meth:`tapping` installs them again)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    @property
    def failures(self) -> list[str]:
        """Why layers of the current (or last) pass could not be tapped (empty: every weight's gradient went to the
        sink or its view)."""
        return self._last.failures

    def written(self) -> list[int]:
        """Indices of the weights whose view (from ``destination``) received a gradient in the current (or last)
        pass."""
        return sorted(self._last.written)

    @contextlib.contextmanager
    def tapping(self, groups: int, sink: Sink | None = None, destination: Destination | None = None) -> Iterator[None]:
        """Within the block, each tapped layer writes its weights' per-group gradients into the view
        ``destination(index)`` offers (``[groups, *weight.shape]``; the first gradient of the pass overwrites it,
        later ones add to it), or where it offers ``None`` (or no ``destination`` is given) hands them to ``sink``
        (needed then: a ValueError when the block starts without it), during backward passes (run the forward and the
        backward inside the block; with gradient checkpointing the backward recomputes tapped forwards). The taps are
        installed on first use and kept: entering and leaving the block only switches the pass on and off."""
        if sink is None and destination is None and self.layers:
            self.layers[0].refuse()
        self.install()
        current = self._current
        tap = self._last = _Pass(groups, sink, destination)
        current.tap = tap
        try:
            yield
        finally:
            current.tap = None
            if current.pending is not None:  # a layer's forward raised between its hooks: autograd back on
                current.pending = None
                torch.set_grad_enabled(True)
