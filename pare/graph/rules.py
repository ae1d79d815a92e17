"""Operator rules: how each operator moves channels (analysis) and how it changes when channels go (rebuild).

A rule is a class with two methods:

* ``analyze(ctx, node)`` sets the output layout(s) of ``node`` from its inputs' layouts, records equalities,
  freezes and parameter uses on ``ctx``;
* ``rebuild(ctx, node)`` returns what changes once channels are removed: a new module (``call_module``), new
  ``(target, args, kwargs)`` (functions and methods), or ``None`` when nothing changes.

Module rules are looked up by type (the first ``isinstance`` match in :data:`MODULE_RULES`); function rules by
canonical name (:mod:`pare.graph.ops`). Anything else is opaque: the channels it touches are frozen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from pare.graph import ops
from pare.graph.layout import Layout, Partition, layout_size, slice_layout
from pare.graph.trace import TensorMeta
from pare.layers import ZeroPadShortcut


@dataclass(frozen=True)
class Value:
    """The channel layout of one tensor (its dim 1). ``expand`` > 1: a flattened tensor whose channel c occupies
    features ``[c*expand, (c+1)*expand)``."""

    layout: Layout
    expand: int = 1


@dataclass(frozen=True)
class Use:
    """A parameter dimension (or a module's channel count) that follows a layout; becomes a group member."""

    module: str
    param: str
    dim: int
    layout: Layout
    expand: int
    role: str  # "out" (producer), "in" (consumer), "norm" (per-channel), "param", "pad"


class Context:
    """Analysis state shared by the rules."""

    def __init__(self, gm: fx.GraphModule, meta: dict[fx.Node, Any]) -> None:
        self.gm = gm
        self.meta = meta
        self.part = Partition()
        self.values: dict[fx.Node, Value | list[Value | None] | None] = {}
        self.uses: list[Use] = []
        self.module_in: dict[str, Layout] = {}
        self.module_out: dict[str, Layout] = {}
        self.param_layouts: dict[tuple[str, int], Layout] = {}
        self.warnings: list[str] = []
        # filled at rebuild time
        self.keep_masks: list[np.ndarray] = []

    # -- analysis helpers -------------------------------------------------------------------------------------

    def value(self, arg: Any) -> Value | None:
        if isinstance(arg, fx.Node):
            v = self.values.get(arg)
            return v if isinstance(v, Value) else None
        return None

    def tensor_meta(self, arg: Any) -> TensorMeta | None:
        if isinstance(arg, fx.Node):
            m = self.meta.get(arg)
            return m if isinstance(m, TensorMeta) else None
        return None

    def fresh(self, node: fx.Node, kind: str, owner: str, reason: str | None = None) -> Value | None:
        """A new space for the node's output channels (frozen when ``reason`` is given)."""
        m = self.meta.get(node)
        if not isinstance(m, TensorMeta) or not m.batched or m.ndim < 2:
            return None
        layout = self.part.new_layout(m.shape[1], kind, owner)
        if reason:
            self.part.freeze(layout, reason)
        return Value(layout)

    def opaque(self, node: fx.Node, reason: str) -> None:
        """Freeze every channel the node reads and give its output frozen channels."""
        for arg in _flat_nodes((node.args, node.kwargs)):
            v = self.value(arg)
            if v is not None:
                self.part.freeze(v.layout, reason)
            elif isinstance(self.values.get(arg), list):
                for item in self.values[arg]:  # type: ignore[union-attr]
                    if item is not None:
                        self.part.freeze(item.layout, reason)
        m = self.meta.get(node)
        if isinstance(m, (tuple, list)):
            self.values[node] = [
                Value(self.part.new_layout(t.shape[1], "opaque", node.name))
                if isinstance(t, TensorMeta) and t.batched and t.ndim >= 2 else None
                for t in m
            ]
            for v in self.values[node]:  # type: ignore[union-attr]
                if v is not None:
                    self.part.freeze(v.layout, reason)
        else:
            self.values[node] = self.fresh(node, "opaque", node.name, reason)
        if reason not in self.warnings:
            self.warnings.append(reason)

    def module_input(self, path: str, layout: Layout) -> None:
        """A module with per-channel state called more than once couples the inputs of all its calls."""
        if path in self.module_in:
            self.part.unify(self.module_in[path], layout)
        else:
            self.module_in[path] = layout

    def producer_output(self, path: str, size: int) -> Layout:
        if path not in self.module_out:
            self.module_out[path] = self.part.new_layout(size, "producer", path)
        return self.module_out[path]

    # -- rebuild helpers --------------------------------------------------------------------------------------

    def kept(self, value: Value | None) -> np.ndarray:
        """Positions (along the tensor's dim 1) that survive, as an int64 array."""
        if value is None:
            return np.zeros(0, dtype=np.int64)
        parts = []
        pos = 0
        for s in value.layout:
            idx = np.flatnonzero(self.keep_masks[s.space][s.start : s.start + s.length]) + pos
            parts.append(idx)
            pos += s.length
        ch = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if value.expand == 1:
            return ch.astype(np.int64)
        return (ch[:, None] * value.expand + np.arange(value.expand)[None, :]).reshape(-1).astype(np.int64)

    def kept_count(self, layout: Layout) -> int:
        return int(sum(self.keep_masks[s.space][s.start : s.start + s.length].sum() for s in layout))


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, fx.Node) else a)
    return out


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _slice_param(p: torch.Tensor | None, dim: int, idx: np.ndarray) -> torch.Tensor | None:
    if p is None:
        return None
    t = torch.as_tensor(idx, dtype=torch.long, device=p.device)
    new = p.detach().index_select(dim, t).clone()
    if isinstance(p, nn.Parameter):
        return nn.Parameter(new, requires_grad=p.requires_grad)
    return new


def clone_module(m: nn.Module) -> nn.Module:
    """A shallow copy of a module with its own parameter, buffer, submodule and hook dictionaries."""
    new = m.__class__.__new__(m.__class__)
    new.__dict__ = m.__dict__.copy()
    for key, val in m.__dict__.items():
        if isinstance(val, OrderedDict):
            new.__dict__[key] = OrderedDict(val)
        elif isinstance(val, dict):
            new.__dict__[key] = dict(val)
    return new


def _set_param(m: nn.Module, name: str, value: torch.Tensor | None) -> None:
    if value is None:
        return
    if name in m._parameters:
        m._parameters[name] = value  # type: ignore[assignment]
    elif name in m._buffers:
        m._buffers[name] = value
    else:
        setattr(m, name, value)


# ---------------------------------------------------------------------------------------------------------------
# Module rules
# ---------------------------------------------------------------------------------------------------------------


class ModuleRule:
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        raise NotImplementedError

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module) -> nn.Module | None:
        return None


def _input_value(ctx: Context, node: fx.Node) -> Value | None:
    return ctx.value(node.args[0]) if node.args else None


class ConvRule(ModuleRule):
    """Conv1d/2d/3d. Plain convs consume their input channels and produce a new space; depthwise convs
    (groups == in == out) pass channels through; other grouped convs are frozen."""

    def _kind(self, m: _ConvNd) -> str:
        if m.groups == 1:
            return "plain"
        if m.groups == m.in_channels == m.out_channels:
            return "depthwise"
        return "grouped"

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, _ConvNd)
        path = str(node.target)
        v = _input_value(ctx, node)
        kind = self._kind(m)
        if v is None or v.expand != 1 or kind == "grouped":
            ctx.opaque(node, f"grouped convolution '{path}' (groups={m.groups}) is not prunable"
                       if kind == "grouped" else f"'{path}' reads an input pare cannot follow")
            return
        ctx.module_input(path, v.layout)
        transposed = bool(m.transposed)
        if kind == "depthwise":
            ctx.values[node] = Value(ctx.module_in[path])
            if path not in ctx.module_out:
                ctx.module_out[path] = ctx.module_in[path]
                ctx.uses.append(Use(path, "weight", 0, v.layout, 1, "out"))
                if m.bias is not None:
                    ctx.uses.append(Use(path, "bias", 0, v.layout, 1, "out"))
            return
        first = path not in ctx.module_out
        out = ctx.producer_output(path, m.out_channels)
        ctx.values[node] = Value(out)
        if first:
            in_dim, out_dim = (0, 1) if transposed else (1, 0)
            ctx.uses.append(Use(path, "weight", in_dim, v.layout, 1, "in"))
            ctx.uses.append(Use(path, "weight", out_dim, out, 1, "out"))
            if m.bias is not None:
                ctx.uses.append(Use(path, "bias", 0, out, 1, "out"))

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module) -> nn.Module | None:
        assert isinstance(m, _ConvNd)
        keep_in = ctx.kept(_input_value(ctx, node))
        keep_out = ctx.kept(ctx.value(node))
        if len(keep_in) == m.in_channels and len(keep_out) == m.out_channels:
            return None
        new = clone_module(m)
        assert isinstance(new, _ConvNd)
        if self._kind(m) == "depthwise":
            new.weight = _slice_param(m.weight, 0, keep_out)  # type: ignore[assignment]
            new.groups = new.in_channels = new.out_channels = len(keep_out)
        else:
            in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
            w = _slice_param(m.weight, out_dim, keep_out)
            new.weight = _slice_param(w, in_dim, keep_in)  # type: ignore[assignment]
            new.in_channels, new.out_channels = len(keep_in), len(keep_out)
        if m.bias is not None:
            new.bias = _slice_param(m.bias, 0, keep_out)  # type: ignore[assignment]
        return new


class LinearRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, nn.Linear)
        path = str(node.target)
        v = _input_value(ctx, node)
        tm = ctx.tensor_meta(node.args[0]) if node.args else None
        if v is None or tm is None or tm.ndim != 2:
            ctx.opaque(node, f"'{path}' applies to a tensor whose features are not its channels")
            return
        ctx.module_input(path, v.layout)
        first = path not in ctx.module_out
        out = ctx.producer_output(path, m.out_features)
        ctx.values[node] = Value(out)
        if first:
            ctx.uses.append(Use(path, "weight", 1, v.layout, v.expand, "in"))
            ctx.uses.append(Use(path, "weight", 0, out, 1, "out"))
            if m.bias is not None:
                ctx.uses.append(Use(path, "bias", 0, out, 1, "out"))

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module) -> nn.Module | None:
        assert isinstance(m, nn.Linear)
        keep_in = ctx.kept(_input_value(ctx, node))
        keep_out = ctx.kept(ctx.value(node))
        if len(keep_in) == m.in_features and len(keep_out) == m.out_features:
            return None
        new = clone_module(m)
        assert isinstance(new, nn.Linear)
        new.weight = _slice_param(_slice_param(m.weight, 0, keep_out), 1, keep_in)  # type: ignore[assignment]
        if m.bias is not None:
            new.bias = _slice_param(m.bias, 0, keep_out)  # type: ignore[assignment]
        new.in_features, new.out_features = len(keep_in), len(keep_out)
        return new


class PerChannelRule(ModuleRule):
    """Modules that act on each channel separately with per-channel state: BatchNorm, InstanceNorm, GroupNorm,
    per-channel PReLU. Channels pass through; parameters are sliced."""

    def _params(self, m: nn.Module) -> list[str]:
        names = ["weight", "bias", "running_mean", "running_var"]
        return [n for n in names if getattr(m, n, None) is not None]

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        path = str(node.target)
        v = _input_value(ctx, node)
        if v is None or v.expand != 1:
            ctx.opaque(node, f"'{path}' reads an input pare cannot follow")
            return
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            ctx.values[node] = v
            return
        first = path not in ctx.module_in
        ctx.module_input(path, v.layout)
        ctx.values[node] = v
        if isinstance(m, nn.GroupNorm):
            ctx.part.require_blocks(v.layout, m.num_channels // m.num_groups)
        if first:
            for name in self._params(m):
                ctx.uses.append(Use(path, name, 0, v.layout, 1, "norm"))

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module) -> nn.Module | None:
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return None
        keep = ctx.kept(ctx.value(node))
        size = {nn.GroupNorm: "num_channels", nn.PReLU: "num_parameters"}
        attr = next((a for t, a in size.items() if isinstance(m, t)), "num_features")
        if len(keep) == getattr(m, attr):
            return None
        new = clone_module(m)
        for name in self._params(m):
            _set_param(new, name, _slice_param(getattr(m, name), 0, keep))
        if isinstance(m, nn.GroupNorm):
            new.num_groups = len(keep) // (m.num_channels // m.num_groups)  # type: ignore[assignment]
        setattr(new, attr, len(keep))
        return new


class LayerNormRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, nn.LayerNorm)
        v = _input_value(ctx, node)
        tm = ctx.tensor_meta(node.args[0]) if node.args else None
        if v is None or tm is None:
            ctx.opaque(node, f"'{node.target}' reads an input pare cannot follow")
            return
        if len(m.normalized_shape) >= tm.ndim - 1:
            ctx.part.freeze(v.layout, f"LayerNorm '{node.target}' normalises over channels")
        ctx.values[node] = v


class PassthroughRule(ModuleRule):
    """Parameter-free modules that act on each channel separately (activations, pooling, dropout, ...)."""

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        v = _input_value(ctx, node)
        if v is None:
            ctx.opaque(node, f"'{node.target}' reads an input pare cannot follow")
            return
        ctx.values[node] = v


class SoftmaxModuleRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        v = _input_value(ctx, node)
        tm = ctx.tensor_meta(node.args[0]) if node.args else None
        dim = getattr(m, "dim", None)
        if v is None or tm is None or dim is None or _norm_dim(dim, tm.ndim) == 1:
            ctx.opaque(node, f"softmax '{node.target}' mixes channels")
            return
        ctx.values[node] = v


class FlattenModuleRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        _reshape_analyze(ctx, node)


class ZeroPadShortcutRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, ZeroPadShortcut)
        v = _input_value(ctx, node)
        if v is None or v.expand != 1:
            ctx.opaque(node, f"'{node.target}' reads an input pare cannot follow")
            return
        ctx.values[node] = _pad_layout(ctx, str(node.target), v.layout, m.pad_front, m.pad_back)

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module) -> nn.Module | None:
        assert isinstance(m, ZeroPadShortcut)
        out, src = ctx.value(node), _input_value(ctx, node)
        if out is None or src is None:
            return None
        front, back = _pad_counts(ctx, out, src, m.pad_front, m.pad_back)
        if (front, back) == (m.pad_front, m.pad_back):
            return None
        new = clone_module(m)
        assert isinstance(new, ZeroPadShortcut)
        new.pad_front, new.pad_back = front, back
        return new


def _pad_layout(ctx: Context, owner: str, layout: Layout, front: int, back: int) -> Value:
    """Layout after padding (positive) or cropping (negative) the channels at both ends."""
    size = layout_size(layout)
    inner = slice_layout(layout, max(0, -front), size - max(0, -back))
    pre = ctx.part.new_layout(front, "pad", owner) if front > 0 else ()
    post = ctx.part.new_layout(back, "pad", owner) if back > 0 else ()
    if pre or post:
        ctx.uses.append(Use(owner, "pad", 1, pre + post, 1, "pad"))
    return Value(pre + inner + post)


MODULE_RULES: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], ModuleRule]] = [
    (_ConvNd, ConvRule()),
    (nn.Linear, LinearRule()),
    ((_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.PReLU), PerChannelRule()),
    (nn.LayerNorm, LayerNormRule()),
    (ZeroPadShortcut, ZeroPadShortcutRule()),
    (nn.Flatten, FlattenModuleRule()),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin), SoftmaxModuleRule()),
    (
        (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
            nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
            nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
            nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
            nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
        ),
        PassthroughRule(),
    ),
]


#: Per-channel module and function kinds that ``ChannelGraph.feature_node`` walks through.
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.PReLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
    nn.Hardswish, nn.Hardtanh, nn.ELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Identity,
)
PER_CHANNEL_FUNCTIONS = frozenset(
    {"relu", "relu6", "gelu", "silu", "hardswish", "hardtanh", "leaky_relu", "elu", "mish", "sigmoid", "tanh", "add"}
)


def module_rule(m: nn.Module) -> ModuleRule | None:
    for types, rule in MODULE_RULES:
        if isinstance(m, types):
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and m.return_indices:
                return None
            return rule
    return None


# ---------------------------------------------------------------------------------------------------------------
# Function and method rules
# ---------------------------------------------------------------------------------------------------------------

FunctionResult = tuple[str, Any, tuple[Any, ...], dict[str, Any]] | None
FunctionRule = Callable[[Context, fx.Node], None]
FunctionRebuild = Callable[[Context, fx.Node], FunctionResult]


def _unary(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0]) if node.args else None
    if v is None:
        ctx.opaque(node, f"'{node.name}' ({node.target}) reads a tensor pare cannot follow")
        return
    ctx.values[node] = v


def _param_layout(ctx: Context, node: fx.Node, dim: int, size: int) -> Layout:
    key = (str(node.target), dim)
    if key not in ctx.param_layouts:
        owner, _, name = str(node.target).rpartition(".")
        layout = ctx.part.new_layout(size, "param", owner)
        ctx.param_layouts[key] = layout
        ctx.uses.append(Use(owner, name, dim, layout, 1, "param"))
    return ctx.param_layouts[key]


def _binary(ctx: Context, node: fx.Node) -> None:
    out = ctx.meta.get(node)
    if not isinstance(out, TensorMeta):
        ctx.values[node] = None
        return
    if not out.batched or out.ndim < 2:
        ctx.values[node] = None
        if out.batched:
            ctx.opaque(node, f"'{node.name}' reduces away the channel dimension")
        return
    channels = out.shape[1]
    result: Value | None = None
    pending: list[Layout] = []
    for arg in _flat_nodes((node.args, node.kwargs)):
        tm = ctx.tensor_meta(arg)
        if tm is None:
            continue
        aligned = tm.ndim - out.ndim + 1
        if aligned < 0 or tm.shape[aligned] == 1:
            continue  # broadcast along channels: couples nothing
        if tm.shape[aligned] != channels:
            ctx.opaque(node, f"'{node.name}' ({node.target}) combines tensors in a way pare cannot follow")
            return
        v = ctx.value(arg)
        if tm.batched:
            if v is None or aligned != 1:
                ctx.opaque(node, f"'{node.name}' ({node.target}) combines tensors in a way pare cannot follow")
                return
            if result is None:
                result = v
            elif v.expand != result.expand:
                ctx.opaque(node, f"'{node.name}' combines a flattened and an unflattened tensor")
                return
            else:
                ctx.part.unify(result.layout, v.layout)
        elif arg.op == "get_attr":
            pending.append(_param_layout(ctx, arg, aligned, channels))
        else:
            ctx.opaque(node, f"'{node.name}' uses a computed per-channel constant")
            return
    if result is None:
        ctx.values[node] = ctx.fresh(node, "opaque", node.name, f"'{node.name}' has no traced channel input")
        return
    for layout in pending:
        if result.expand != 1:
            ctx.opaque(node, f"'{node.name}' combines a flattened tensor with a parameter")
            return
        ctx.part.unify(result.layout, layout)
    ctx.values[node] = result


def _cat(ctx: Context, node: fx.Node) -> None:
    tensors = _arg(node, 0, "tensors")
    out = ctx.tensor_meta(node)
    if out is None or not isinstance(tensors, (list, tuple)):
        ctx.opaque(node, f"'{node.name}' (cat) has inputs pare cannot follow")
        return
    dim = _norm_dim(_arg(node, 1, "dim", 0), out.ndim)
    values = [ctx.value(t) for t in tensors]
    if any(v is None for v in values) or not out.batched:
        ctx.opaque(node, f"'{node.name}' (cat) has inputs pare cannot follow")
        return
    vals: list[Value] = values  # type: ignore[assignment]
    if dim == 1:
        if len({v.expand for v in vals}) != 1:
            ctx.opaque(node, f"'{node.name}' concatenates tensors flattened differently")
            return
        ctx.values[node] = Value(tuple(s for v in vals for s in v.layout), vals[0].expand)
        return
    for v in vals[1:]:
        ctx.part.unify(vals[0].layout, v.layout)
    ctx.values[node] = vals[0]


def _split(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    outs = ctx.meta.get(node)
    if v is None or src is None or not isinstance(outs, (tuple, list)):
        ctx.opaque(node, f"'{node.name}' splits a tensor pare cannot follow")
        return
    dim = _norm_dim(_arg(node, 2, "dim", 0), src.ndim)
    if dim != 1:
        ctx.values[node] = [v for _ in outs]
        return
    if v.expand != 1:
        ctx.opaque(node, f"'{node.name}' splits a flattened tensor")
        return
    values: list[Value | None] = []
    pos = 0
    for t in outs:
        n = t.shape[1]
        values.append(Value(slice_layout(v.layout, pos, pos + n)))
        pos += n
    ctx.values[node] = values


def _split_rebuild(ctx: Context, node: fx.Node) -> FunctionResult:
    items = ctx.values.get(node)
    src = ctx.tensor_meta(node.args[0])
    if not isinstance(items, list) or src is None or _norm_dim(_arg(node, 2, "dim", 0), src.ndim) != 1:
        return None
    old = [layout_size(v.layout) for v in items if v is not None]
    new = [ctx.kept_count(v.layout) for v in items if v is not None]
    if old == new:
        return None
    return ("call_function", torch.split, (node.args[0], new), {"dim": 1})


def _narrow(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    if v is None or src is None:
        ctx.opaque(node, f"'{node.name}' narrows a tensor pare cannot follow")
        return
    dim, start, length = (_arg(node, 1, "dim"), _arg(node, 2, "start"), _arg(node, 3, "length"))
    if not all(isinstance(a, int) for a in (dim, start, length)):
        ctx.opaque(node, f"'{node.name}' narrows with computed bounds")
        return
    if _norm_dim(dim, src.ndim) != 1:
        ctx.values[node] = v
        return
    start = start + src.shape[1] if start < 0 else start
    if v.expand != 1:
        ctx.opaque(node, f"'{node.name}' narrows a flattened tensor")
        return
    ctx.values[node] = Value(slice_layout(v.layout, start, start + length))


def _narrow_rebuild(ctx: Context, node: fx.Node) -> FunctionResult:
    src = ctx.tensor_meta(node.args[0])
    v = ctx.value(node.args[0])
    if src is None or v is None or _norm_dim(_arg(node, 1, "dim"), src.ndim) != 1:
        return None
    start, length = _arg(node, 2, "start"), _arg(node, 3, "length")
    start = start + src.shape[1] if start < 0 else start
    new_start = ctx.kept_count(slice_layout(v.layout, 0, start))
    new_len = ctx.kept_count(slice_layout(v.layout, start, start + length))
    if (new_start, new_len) == (start, length):
        return None
    return ("call_function", torch.narrow, (node.args[0], 1, new_start, new_len), {})


def _index_items(index: Any, ndim: int) -> list[Any] | None:
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1:
        return None
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = ndim - (len(items) - 1 - sum(1 for i in items if i is None))
        items = items[:k] + [slice(None)] * fill + items[k + 1 :]
    return items


def _getitem(ctx: Context, node: fx.Node) -> None:
    src_node, index = node.args[0], node.args[1]
    container = ctx.values.get(src_node) if isinstance(src_node, fx.Node) else None
    if isinstance(container, list):
        ctx.values[node] = container[index] if isinstance(index, int) else None
        return
    src = ctx.tensor_meta(src_node)
    v = ctx.value(src_node)
    if src is None:
        ctx.values[node] = None
        return
    if v is None:
        ctx.opaque(node, f"'{node.name}' indexes a tensor pare cannot follow")
        return
    items = _index_items(index, src.ndim)
    simple = items is not None and all(isinstance(i, slice) for i in items)
    if not simple or len(items) < 1 or items[0] != slice(None):  # type: ignore[arg-type, index]
        ctx.opaque(node, f"'{node.name}' indexes the batch or channel dimension in a way pare cannot follow")
        return
    assert items is not None
    if len(items) < 2 or items[1] == slice(None):
        ctx.values[node] = v
        return
    sl: slice = items[1]
    if sl.step not in (None, 1) or v.expand != 1 or not all(
        isinstance(b, int) or b is None for b in (sl.start, sl.stop)
    ):
        ctx.opaque(node, f"'{node.name}' slices channels with a step or computed bounds")
        return
    start, stop, _ = sl.indices(src.shape[1])
    ctx.values[node] = Value(slice_layout(v.layout, start, max(start, stop)))


def _getitem_rebuild(ctx: Context, node: fx.Node) -> FunctionResult:
    src_node, index = node.args[0], node.args[1]
    src = ctx.tensor_meta(src_node)
    v = ctx.value(src_node)
    if src is None or v is None or isinstance(ctx.values.get(src_node), list):
        return None
    items = _index_items(index, src.ndim)
    if items is None or len(items) < 2 or not isinstance(items[1], slice) or items[1] == slice(None):
        return None
    start, stop, _ = items[1].indices(src.shape[1])
    stop = max(start, stop)
    new_start = ctx.kept_count(slice_layout(v.layout, 0, start))
    new_stop = new_start + ctx.kept_count(slice_layout(v.layout, start, stop))
    if (new_start, new_stop) == (start, stop):
        return None
    new_items = list(index) if isinstance(index, tuple) else [index]
    if new_items[0] is Ellipsis:
        return None
    new_items[1] = slice(new_start, new_stop, None)
    return ("call_function", node.target, (src_node, tuple(new_items)), {})


def _pad(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    pad = _arg(node, 1, "pad")
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", None)
    if v is None or src is None or not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        ctx.opaque(node, f"'{node.name}' pads a tensor pare cannot follow")
        return
    k = 2 * (src.ndim - 2)
    if len(pad) <= k:
        ctx.values[node] = v
        return
    front, back = pad[k], pad[k + 1] if len(pad) > k + 1 else 0
    if (front == 0 and back == 0) or v.expand != 1:
        ctx.values[node] = v if v.expand == 1 else None
        if v.expand != 1:
            ctx.opaque(node, f"'{node.name}' pads a flattened tensor")
        return
    if mode != "constant" or value not in (None, 0, 0.0):
        ctx.opaque(node, f"'{node.name}' pads channels with non-zero values")
        return
    ctx.values[node] = _pad_layout(ctx, node.name, v.layout, front, back)


def _pad_counts(ctx: Context, node_value: Value, src: Value, front: int, back: int) -> tuple[int, int]:
    size = layout_size(src.layout)
    out_size = layout_size(node_value.layout)
    new_front = (
        ctx.kept_count(slice_layout(node_value.layout, 0, front)) if front > 0
        else -ctx.kept_count(slice_layout(src.layout, 0, -front))
    )
    new_back = (
        ctx.kept_count(slice_layout(node_value.layout, out_size - back, out_size)) if back > 0
        else -ctx.kept_count(slice_layout(src.layout, size + back, size))
    )
    return new_front, new_back


def _pad_rebuild_fn(ctx: Context, node: fx.Node) -> FunctionResult:
    v, src = ctx.value(node), ctx.value(node.args[0])
    stm = ctx.tensor_meta(node.args[0])
    pad = _arg(node, 1, "pad")
    if v is None or src is None or stm is None:
        return None
    k = 2 * (stm.ndim - 2)
    if len(pad) <= k:
        return None
    front, back = pad[k], pad[k + 1] if len(pad) > k + 1 else 0
    new_front, new_back = _pad_counts(ctx, v, src, front, back)
    if (new_front, new_back) == (front, back):
        return None
    new_pad = list(pad) + [0] * max(0, k + 2 - len(pad))
    new_pad[k], new_pad[k + 1] = new_front, new_back
    args = (node.args[0], tuple(new_pad), *node.args[2:])
    return (node.op, node.target, args, dict(node.kwargs))


def _reshape_analyze(ctx: Context, node: fx.Node) -> None:
    src_node = node.args[0] if node.args else node.kwargs.get("input")
    v = ctx.value(src_node)
    src = ctx.tensor_meta(src_node)
    out = ctx.tensor_meta(node)
    if v is None or src is None or out is None:
        ctx.opaque(node, f"'{node.name}' reshapes a tensor pare cannot follow")
        return
    if out.ndim >= 2 and out.shape[0] == src.shape[0]:
        rest_src = int(np.prod(src.shape[2:], dtype=np.int64))
        rest_out = int(np.prod(out.shape[2:], dtype=np.int64))
        if out.shape[1] == src.shape[1] and rest_src == rest_out:
            ctx.values[node] = v
            return
        if out.ndim == 2 and out.shape[1] == src.shape[1] * rest_src:
            ctx.values[node] = Value(v.layout, v.expand * rest_src)
            return
        channels = layout_size(v.layout)
        if (
            src.ndim == 2
            and out.shape[1] == channels
            and out.shape[1] * rest_out == src.shape[1]
            and v.expand == rest_out
        ):
            ctx.values[node] = Value(v.layout, 1)
            return
    ctx.opaque(node, f"'{node.name}' ({node.target}) reshapes the channel dimension")


def _reshape_rebuild(ctx: Context, node: fx.Node) -> FunctionResult:
    name = ops.canonical_name(node.op, node.target)
    if name not in ("view", "reshape"):
        return None
    v, out = ctx.value(node), ctx.tensor_meta(node)
    if v is None or out is None:
        return None
    new_dim1 = len(ctx.kept(v))
    if new_dim1 == out.shape[1] or out.ndim < 2:
        return None
    shape_args = list(node.args[1:])
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = list(shape_args[0])
    if len(shape_args) != out.ndim:
        return None
    old = list(out.shape)
    new = old.copy()
    new[1] = new_dim1
    changed = False
    for i, a in enumerate(shape_args):
        if isinstance(a, int) and a != -1 and a == old[i] and old[i] != new[i]:
            shape_args[i] = new[i]
            changed = True
    if not changed:
        return None
    return (node.op, node.target, (node.args[0], *shape_args), dict(node.kwargs))


def _reduce(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0]) if node.args else None
    src = ctx.tensor_meta(node.args[0]) if node.args else None
    out = ctx.meta.get(node)
    if v is None or src is None:
        ctx.opaque(node, f"'{node.name}' reduces a tensor pare cannot follow")
        return
    dims = _arg(node, 1, "dim", None)
    if dims is None or not isinstance(out, TensorMeta):
        ctx.opaque(node, f"'{node.name}' reduces over every dimension")
        return
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        ctx.opaque(node, f"'{node.name}' reduces over computed dimensions")
        return
    dims = [_norm_dim(d, src.ndim) for d in dims]
    if 0 in dims or 1 in dims or v.expand != 1:
        ctx.opaque(node, f"'{node.name}' reduces over the channel or batch dimension")
        return
    ctx.values[node] = v


def _max_min(ctx: Context, node: fx.Node) -> None:
    tensor_args = [a for a in _flat_nodes(node.args) if ctx.tensor_meta(a) is not None]
    if len(tensor_args) >= 2:
        _binary(ctx, node)
    else:
        ctx.opaque(node, f"'{node.name}' ({node.target}) reduces or indexes values")


def _permute(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    if v is None or src is None:
        ctx.opaque(node, f"'{node.name}' permutes a tensor pare cannot follow")
        return
    name = ops.canonical_name(node.op, node.target)
    if name == "permute":
        perm = node.args[1:] if not isinstance(_arg(node, 1, "dims"), (tuple, list)) else _arg(node, 1, "dims")
        perm = [_norm_dim(p, src.ndim) for p in perm] if all(isinstance(p, int) for p in perm) else None
        keeps = perm is not None and perm[0] == 0 and perm[1] == 1
    else:
        a, b = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        keeps = isinstance(a, int) and isinstance(b, int) and not (
            {_norm_dim(a, src.ndim), _norm_dim(b, src.ndim)} & {0, 1}
        )
    if not keeps or v.expand != 1:
        ctx.opaque(node, f"'{node.name}' ({name}) moves the channel dimension")
        return
    ctx.values[node] = v


def _softmax(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    dim = _arg(node, 1, "dim")
    if v is None or src is None or not isinstance(dim, int) or _norm_dim(dim, src.ndim) == 1:
        ctx.opaque(node, f"'{node.name}' ({node.target}) mixes channels")
        return
    ctx.values[node] = v


def _normalize(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    dim = _arg(node, 2, "dim", 1)
    if v is None or src is None or not isinstance(dim, int) or _norm_dim(dim, src.ndim) == 1:
        ctx.opaque(node, f"'{node.name}' (normalize) mixes channels")
        return
    ctx.values[node] = v


def _no_tensor(ctx: Context, node: fx.Node) -> None:
    ctx.values[node] = None


FUNCTION_RULES: dict[str, FunctionRule] = {
    **{name: _unary for name in ops.UNARY},
    **{name: _binary for name in ops.BINARY},
    **{name: _reshape_analyze for name in ops.RESHAPE},
    **{name: _reduce for name in ops.REDUCE},
    "cat": _cat, "concat": _cat, "concatenate": _cat,
    "split": _split, "chunk": _split,
    "narrow": _narrow,
    "getitem": _getitem,
    "pad": _pad,
    "permute": _permute, "transpose": _permute,
    "softmax": _softmax, "log_softmax": _softmax,
    "normalize": _normalize,
    "max": _max_min, "min": _max_min,
    "size": _no_tensor, "dim": _no_tensor, "getattr": _no_tensor,
}

FUNCTION_REBUILDS: dict[str, FunctionRebuild] = {
    "split": _split_rebuild, "chunk": _split_rebuild,
    "narrow": _narrow_rebuild,
    "getitem": _getitem_rebuild,
    "pad": _pad_rebuild_fn,
    "view": _reshape_rebuild, "reshape": _reshape_rebuild,
}


def function_rule(node: fx.Node) -> tuple[str | None, FunctionRule | None]:
    name = ops.canonical_name(node.op, node.target)
    return name, (FUNCTION_RULES.get(name) if name else None)
