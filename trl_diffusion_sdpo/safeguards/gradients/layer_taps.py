"""Per-layer gradient taps: each trainable weight's gradient split by groups of batch rows, inside one backward pass.

The exact safeguard needs the winner's and the loser's share of every trainable weight's gradient. The batch's rows
are independent samples (no layer of a denoiser mixes samples), so one forward pass over ``[winners; losers]`` and
one backward pass already give every layer the right output gradient on every row; only a weight gradient's sum over
rows mixes the two branches. A tap computes that sum per group of rows instead, from the layer's saved input and its
output gradient, as per-sample-gradient libraries do (Opacus' grad samplers), with two groups (the branches) or
``2B`` (one per image: the per-pair scope)::

    Linear:  dW_k = sum_{r in group k} g_r x_r^T,  db_k = sum_{r in group k} g_r      (one batched matmul)
    ConvNd:  dx_k, dW_k, db_k = convolution_backward over group k's rows              (one call per group)
    LayerNorm, GroupNorm: dgamma_k = sum_{group k} g * x_hat, dbeta_k = sum g      (aten's native backward for dx)
    other norms, embeddings (leaf modules of the types in :data:`RECOMPUTED`): the layer's forward recomputed per
             group under autograd (elementwise work, small against the matmuls)

The group sums together are what autograd's one sum would be: FLOPs equal to one weight gradient's, no second pass
through the network. The layer's input gradient is computed once over all rows, as usual. A tapped layer writes its
weights' per-group gradients (``[groups, *weight.shape]``) into the view the caller's ``destination`` offers for
each weight (the first gradient of the pass overwrites it, any later one adds to it), or hands them to a sink
(``sink(index, per_group)``) where it offers none, and returns none to autograd, so ``.grad`` is not touched by the
pass.

A tap runs on every tapped layer in every step, so its Python is kept to a few calls: what a layer needs (its
weights' indices and views, a convolution's arguments, resolved aten overloads) is looked up when it is built or
when the pass starts, not in the forward or the backward.

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
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RECOMPUTED", "Destination", "LayerTaps", "Sink"]

Sink = Callable[[int, torch.Tensor], None]
# index -> the ``[groups, *weight.shape]`` view weight ``index``'s per-group gradients are written into, or None (sink)
Destination = Callable[[int], "torch.Tensor | None"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default
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
    """How a module's own weights are tapped: ``"linear"``, ``"conv"``, ``"recompute"``, or ``None`` (not covered)."""
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
    """What the layers of one tapped pass share: the number of row groups, the sink and the failures."""

    __slots__ = ("groups", "sink", "failures")

    def __init__(self, groups: int, sink: Sink | None) -> None:
        self.groups, self.sink = groups, sink
        self.failures: list[str] = []


class _Layer:
    """One tapped module: its weights' indices in the caller's parameter list (``slots``: ``(attribute, index)``,
    the weight first), and per pass the views its gradients go to and whether each was written yet."""

    __slots__ = ("name", "module", "kind", "slots", "weight", "bias", "conv_args", "views", "written", "destination",
                 "has_sink")  # fmt: skip

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
        self.views: dict[int, torch.Tensor | None] = {}
        self.written: dict[int, bool] = {}
        self.destination: Destination | None = None
        self.has_sink = False

    def start(self, destination: Destination | None, sink: Sink | None) -> None:
        """Start a pass (no weight written yet). The views are asked of ``destination`` when the backward first
        reaches the weight, not here: a store may allocate them then (the one pass's pieces), after the forward."""
        self.destination, self.has_sink = destination, sink is not None
        if not self.has_sink and destination is None:
            self._refuse()
        self.views = {}
        self.written = {i: False for _, i in self.slots}

    def _refuse(self) -> None:
        where = self.name or type(self.module).__name__
        raise ValueError(f"{where}: a weight has no view to write its gradient into and no sink was given")

    def view(self, index: int) -> torch.Tensor | None:
        """Weight ``index``'s view for this pass (asked of ``destination`` once), or None: its gradient goes to the
        sink."""
        if index not in self.views:
            view = self.destination(index) if self.destination is not None else None
            if view is None and not self.has_sink:
                self._refuse()
            self.views[index] = view
        return self.views[index]

    def target(self, index: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The view to overwrite with weight ``index``'s per-group gradient, where this is its first of the pass
        and ``dtype`` is the view's (then marked written); else ``None``: hand the gradient to :meth:`deliver`."""
        view = self.view(index)
        if view is None or self.written[index] or view.dtype != dtype:
            return None
        self.written[index] = True
        return view

    def deliver(self, index: int, per_group: torch.Tensor, tap: _Pass) -> None:
        """Weight ``index``'s per-group gradient computed apart: copied into its view (added, after the first), or
        handed to the sink where there is no view."""
        view = self.view(index)
        if view is None:
            tap.sink(index, per_group)
        elif self.written[index]:
            view.add_(per_group)
        else:
            view.copy_(per_group)
            self.written[index] = True


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _group_sum(layer: _Layer, tap: _Pass, index: int, values: torch.Tensor, dims: int | tuple[int, ...]) -> None:
    """Weight ``index``'s per-group gradient ``values.sum(dims)`` (``values``' leading dimension: the groups),
    summed straight into its view where it can be."""
    into = layer.target(index, values.dtype)
    if into is None:
        layer.deliver(index, values.sum(dims), tap)
    else:
        torch.sum(values, dims, out=into)


class _LinearTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, tap: _Pass):
        ctx.layer, ctx.tap, ctx.has_bias = layer, tap, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        layer, tap = ctx.layer, ctx.tap
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        per_group_g = grad.reshape(tap.groups, -1, grad.shape[-1])
        index = layer.weight
        if index is not None:
            per_group_g_t = per_group_g.transpose(1, 2)
            per_group_x = x.reshape(tap.groups, -1, x.shape[-1])
            into = layer.target(index, grad.dtype)  # the batched matmul writes straight into the split buffer
            if into is None:
                layer.deliver(index, torch.bmm(per_group_g_t, per_group_x), tap)
            else:
                torch.bmm(per_group_g_t, per_group_x, out=into)
        if ctx.has_bias and layer.bias is not None:
            _group_sum(layer, tap, layer.bias, per_group_g, 1)
        return grad_x, None, None, None, None


#: A CPU convolution whose rows per group times output pixels are at most this gets its per-group weight gradients
#: from the unfolded input and one batched matmul: on tiny feature maps oneDNN's weight-gradient call costs about as
#: much for half the rows as for all of them, so two calls would cost twice one (see _ConvTap).
UNFOLD_MAX_ROWS_TIMES_PIXELS = 32


class _ConvTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, tap: _Pass):
        ctx.layer, ctx.tap, ctx.has_bias = layer, tap, bias is not None
        ctx.save_for_backward(x, weight)
        return layer.module._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        # The input gradient over all rows in one call, as autograd computes it; the weight and bias gradients per
        # group of rows: one weight-gradient call per group (the same FLOPs as one over all rows), or on tiny CPU
        # feature maps one batched matmul over the unfolded input (_unfolded_weight_gradients).
        x, weight = ctx.saved_tensors
        layer, tap = ctx.layer, ctx.tap
        args, groups = layer.conv_args, tap.groups
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _CONV_BACKWARD(grad, x, weight, None, *args, (True, False, False))[0]
        if ctx.has_bias and layer.bias is not None:
            pixels = math.prod(grad.shape[2:])
            _group_sum(layer, tap, layer.bias, grad.reshape(groups, -1, grad.shape[1], pixels), (1, 3))
        index = layer.weight
        if index is None:
            return grad_x, None, None, None, None
        into = layer.target(index, grad.dtype)
        if _unfolds(layer.module, x, grad, groups):
            per_group = _unfolded_weight_gradients(layer.module, x, grad, groups, into)
            if into is None:
                layer.deliver(index, per_group, tap)
            return grad_x, None, None, None, None
        parts = []
        for k, (g, xs) in enumerate(zip(grad.chunk(groups), x.chunk(groups))):
            dw = _CONV_BACKWARD(g, xs, weight, None, *args, (False, True, False))[1]
            if into is None:
                parts.append(dw)
            else:
                into[k].copy_(dw)
        if into is None:
            layer.deliver(index, torch.stack(parts), tap)
        return grad_x, None, None, None, None


def _unfolds(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor, groups: int) -> bool:
    """Whether :func:`_unfolded_weight_gradients` computes this convolution's weight gradients (CPU, 2-D, not
    grouped, tiny feature maps)."""
    if x.device.type != "cpu" or x.dim() != 4 or conv.groups != 1:
        return False
    return (x.shape[0] // groups) * math.prod(grad.shape[2:]) <= UNFOLD_MAX_ROWS_TIMES_PIXELS


def _unfolded_weight_gradients(
    conv: nn.Module, x: torch.Tensor, grad: torch.Tensor, groups: int, into: torch.Tensor | None
) -> torch.Tensor:
    """``dW_k = sum_{rows r of group k, output pixels p} g[r, :, p] unfold(x)[r, :, p]^T``: one batched matmul over
    the groups, written into ``into`` where given."""
    rows, out_channels = grad.shape[:2]
    n = rows // groups
    unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [rows, C*k*k, pixels]
    patch, pixels = unfolded.shape[1:]
    per_group_g = grad.reshape(groups, n, out_channels, pixels).transpose(1, 2).reshape(groups, out_channels, -1)
    per_group_x = unfolded.view(groups, n, patch, pixels).transpose(2, 3).reshape(groups, n * pixels, patch)
    if into is None:
        return torch.bmm(per_group_g, per_group_x).view(groups, *conv.weight.shape)
    torch.bmm(per_group_g, per_group_x, out=into.view(groups, out_channels, patch))
    return into


def _group_norm_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout aten's group norm reads ``x`` in (its ``suggest_memory_format``): channels-last where ``x`` is dense
    channels-last and not also NCHW-contiguous, else NCHW."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if channels_last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


class _NormTap(torch.autograd.Function):
    """LayerNorm and GroupNorm through aten's native kernels: the input gradient as autograd computes it, the
    affine weights' per-group gradients ``sum g * x_hat`` and ``sum g`` from the saved mean and inverse std."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: _Layer, tap: _Pass):
        ctx.layer, ctx.tap, ctx.has_bias = layer, tap, bias is not None
        module = layer.module
        # aten's native norm kernels read a dense layout. GroupNorm's, as F.group_norm hands it over: a channels-last
        # input (a UNet's first convolution's output on the CPU) stays channels-last, whose kernel sums in another
        # order; made NCHW, the layer's output would move by rounding and a policy equal to its reference (full
        # tuning at step 0) would not give u = 0 exactly.
        memory_format = _group_norm_layout(x) if isinstance(module, nn.GroupNorm) else torch.contiguous_format
        if not x.is_contiguous(memory_format=memory_format):
            x = x.contiguous(memory_format=memory_format)
        if isinstance(module, nn.GroupNorm):
            n, c = x.shape[:2]
            hw = x.numel() // max(n * c, 1)
            ctx.shape = (n, c, hw, module.num_groups)
            out, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, module.num_groups, module.eps)
        else:
            ctx.shape = None
            out, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, weight, bias, module.eps)
        # the backward kernels read NCHW (aten's group norm backward crashes on a channels-last input here)
        ctx.save_for_backward(x.contiguous(), weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad = grad if grad.is_contiguous() else grad.contiguous()
        layer, tap = ctx.layer, ctx.tap
        groups = tap.groups
        want_w, want_b = layer.weight is not None, ctx.has_bias and layer.bias is not None
        if groups == 2:
            # aten's fused kernel twice: over all rows (the input gradient and the affine gradients' sum) and over
            # the first group's rows (its affine gradients); the second group's are the difference
            mask = (ctx.needs_input_grad[0], want_w, want_b)
            half = x.shape[0] // 2
            if ctx.shape is not None:  # GroupNorm: x [N, C, ...], mean and rstd [N, G]
                n, c, hw, g = ctx.shape
                grad_x, dw, db = _GROUP_NORM_BACKWARD(grad, x, mean, rstd, weight, n, c, hw, g, mask)
                _, dw0, db0 = _GROUP_NORM_BACKWARD(
                    grad[:half], x[:half], mean[:half], rstd[:half], weight, half, c, hw, g, (False, want_w, want_b)
                )
            else:  # LayerNorm over the trailing normalized_shape; mean and rstd [..., 1, ...]
                shape = layer.module.normalized_shape
                grad_x, dw, db = _LAYER_NORM_BACKWARD(grad, x, shape, mean, rstd, weight, bias, mask)
                _, dw0, db0 = _LAYER_NORM_BACKWARD(
                    grad[:half], x[:half], shape, mean[:half], rstd[:half], weight, bias, (False, want_w, want_b)
                )
            for index, wanted, total, first in ((layer.weight, want_w, dw, dw0), (layer.bias, want_b, db, db0)):
                if wanted:
                    into = layer.target(index, total.dtype)
                    if into is None:
                        layer.deliver(index, torch.stack([first, total - first]), tap)
                    else:
                        into[0].copy_(first)
                        torch.sub(total, first, out=into[1])
            return grad_x, None, None, None, None
        mask = (ctx.needs_input_grad[0], False, False)
        if ctx.shape is not None:  # GroupNorm: x [N, C, ...], mean and rstd [N, G]
            n, c, hw, g = ctx.shape
            grad_x = _GROUP_NORM_BACKWARD(grad, x, mean, rstd, weight, n, c, hw, g, mask)[0]
            per_channel = (c // g, hw)
            stats = (mean.view(n, g, 1, 1), rstd.view(n, g, 1, 1))
            x_hat = (x.reshape(n, g, *per_channel) - stats[0]) * stats[1]
            dw = (grad.reshape(n, g, *per_channel) * x_hat).sum(-1).reshape(groups, -1, c).sum(1)
            db = grad.reshape(n, c, hw).sum(-1).reshape(groups, -1, c).sum(1)
        else:  # LayerNorm over the trailing normalized_shape; mean and rstd [..., 1, ...]
            shape = layer.module.normalized_shape
            grad_x = _LAYER_NORM_BACKWARD(grad, x, shape, mean, rstd, weight, None, mask)[0]
            x_hat = (x - mean) * rstd
            dw = (grad * x_hat).reshape(groups, -1, *shape).sum(1)
            db = grad.reshape(groups, -1, *shape).sum(1)
        if want_w:
            layer.deliver(layer.weight, dw, tap)
        if want_b:
            layer.deliver(layer.bias, db, tap)
        return grad_x, None, None, None, None


class _RecomputeTap(torch.autograd.Function):
    """The layer's forward without autograd; its backward recomputes it per group of rows under autograd."""

    @staticmethod
    def forward(ctx, x, layer: _Layer, tap: _Pass, forward: Callable, autocast: torch.dtype | None, *weights):
        ctx.layer, ctx.tap, ctx.run, ctx.autocast = layer, tap, forward, autocast
        ctx.save_for_backward(x)
        return forward(x)

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
                out = ctx.run(xs)
                inputs = ([xs] if needs_x else []) + weights
                found = torch.autograd.grad(out, inputs, g, allow_unused=True)
                if needs_x:
                    grads_x.append(found[0])
                    found = found[1:]
                for i, (w, dw) in enumerate(zip(weights, found)):
                    per_weight[i].append(torch.zeros_like(w) if dw is None else dw)
        for (_, index), dws in zip(layer.slots, per_weight):
            layer.deliver(index, torch.stack(dws), tap)
        grad_x = torch.cat(grads_x) if needs_x else None
        return (grad_x, None, None, None, None) + (None,) * len(weights)


_FUNCTIONS = {"linear": _LinearTap, "conv": _ConvTap, "norm": _NormTap}


class _Current:
    """The pass the taps of one :class:`LayerTaps` write to (``None`` outside :meth:`LayerTaps.tapping`: a recompute
    after the block runs untapped)."""

    __slots__ = ("tap",)

    def __init__(self) -> None:
        self.tap: _Pass | None = None


def _refusal(layer: _Layer, tap: _Pass, args: tuple, kwargs: dict) -> str | None:
    """Why this call cannot be tapped, or None where it can: one tensor input whose leading dimension splits into the
    pass's groups of rows."""
    if len(args) != 1 or kwargs:
        return (
            f"{layer.name} was called with {len(args)} positional and {len(kwargs)} keyword arguments (a tap takes "
            "one input)"
        )
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] >= tap.groups and x.shape[0] % tap.groups == 0:
        return None
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    return (
        f"{layer.name} saw an input of shape {shape}, whose leading dimension does not split into {tap.groups} "
        "groups of rows"
    )


def _tapped_forward(layer: _Layer, original: Callable, current: _Current) -> Callable:
    module = layer.module
    parameters = module._parameters  # read directly: nn.Module.__getattr__ costs a lookup chain per call
    recompute = layer.kind == "recompute"
    function = None if recompute else _FUNCTIONS[layer.kind]
    # autocast's policy made explicit (linear and convolution in its dtype, norms in float32): the tap then runs
    # without autocast
    norm = layer.kind == "norm"

    def forward(*args, **kwargs):
        tap = current.tap
        if tap is None or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        refusal = _refusal(layer, tap, args, kwargs)
        if refusal is not None:
            tap.failures.append(refusal)
            return original(*args, **kwargs)
        x = args[0]
        if recompute:
            weights = [parameters[name] for name, _ in layer.slots]
            return _RecomputeTap.apply(x, layer, tap, original, _autocast_dtype(x), *weights)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type) and x.is_floating_point():
            dtype = torch.float32 if norm else torch.get_autocast_dtype(device_type)
            weight, bias = parameters["weight"].to(dtype), parameters.get("bias")
            bias = bias.to(dtype) if bias is not None else None
            with torch.autocast(device_type, enabled=False):
                return function.apply(x.to(dtype), weight, bias, layer, tap)
        return function.apply(x, parameters["weight"], parameters.get("bias"), layer, tap)

    return forward


class LayerTaps:
    """The taps over ``module`` for the trainable ``parameters`` (indices into that list go to the sink).

    Build once; :meth:`tapping` installs the taps for one forward and backward pass.
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
        self._failures: list[str] = []

    @property
    def failures(self) -> list[str]:
        """Why layers of the current (or last) pass could not be tapped (empty: every weight's gradient went to the
        sink or its view)."""
        tap = self._current.tap
        return tap.failures if tap is not None else self._failures

    def written(self) -> list[int]:
        """Indices of the weights whose view (from ``destination``) received a gradient in the current (or last)
        pass."""
        return [index for layer in self.layers for index, done in layer.written.items() if done]

    @contextlib.contextmanager
    def tapping(self, groups: int, sink: Sink | None = None, destination: Destination | None = None) -> Iterator[None]:
        """Within the block, each tapped layer writes its weights' per-group gradients into the view
        ``destination(index)`` offers (``[groups, *weight.shape]``; the first gradient of the pass overwrites it,
        later ones add to it), or where it offers ``None`` (or no ``destination`` is given) hands them to ``sink``
        (needed then: a ValueError when the block starts without it), during backward passes (run the forward and the
        backward inside the block; with gradient checkpointing the backward recomputes tapped forwards)."""
        tap = _Pass(groups, sink)
        for layer in self.layers:
            layer.start(destination, sink)
        saved = []
        for layer in self.layers:
            had = layer.module.__dict__.get("forward")
            original = had if had is not None else layer.module.forward
            layer.module.forward = _tapped_forward(layer, original, self._current)
            saved.append(had)
        self._current.tap = tap
        try:
            yield
        finally:
            self._current.tap = None
            for layer, had in zip(self.layers, saved):
                if had is None:
                    del layer.module.forward
                else:
                    layer.module.forward = had
            self._failures = tap.failures
