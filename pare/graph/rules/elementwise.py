"""Element-wise and per-channel operators: activations, dropout, pooling, arithmetic, reductions over space.

Each also says what a removed channel becomes through it (``Value.removed``): the tables below name the operators
that map zero to a non-zero constant (sigmoid, exp, ...), those that keep zero but randomise a constant (dropout in
train mode) and those whose output for a removed channel depends on the input.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from pare.graph import ops
from pare.graph.layout import Layout
from pare.graph.rules.base import (
    CONST,
    DYNAMIC,
    ZERO,
    Context,
    ModuleRule,
    Use,
    Value,
    arg,
    flat_nodes,
    input_value,
    norm_dim,
    worst,
)
from pare.graph.rules.registry import register_function, register_module
from pare.graph.trace import TensorMeta

#: f(0) != 0 (and a constant maps to a constant)
TO_CONST = frozenset({
    "sigmoid", "hardsigmoid", "exp", "cos", "softplus", "logsigmoid", "clamp", "clip", "clamp_min", "clamp_max",
    "threshold", "ones_like", "full_like", "pow",
})
#: zero stays zero, a constant becomes random (train mode)
ZERO_ONLY = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "rrelu"})
#: the output on a removed channel depends on the input (or is not finite)
TO_DYNAMIC = frozenset({
    "alpha_dropout", "feature_alpha_dropout", "rand_like", "randn_like", "empty_like", "log", "rsqrt", "reciprocal",
})


def transform(state: str, kind: str) -> str:
    """What a removed channel in ``state`` becomes through an operator of ``kind`` (keep/const/zero_only/dynamic)."""
    if kind == "const":
        return worst(state, CONST)
    if kind == "zero_only":
        return ZERO if state == ZERO else DYNAMIC
    if kind == "dynamic":
        return DYNAMIC
    return state


def unary_kind(name: str) -> str:
    if name in TO_CONST:
        return "const"
    if name in ZERO_ONLY:
        return "zero_only"
    return "dynamic" if name in TO_DYNAMIC else "keep"


_CONST_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.Threshold)
_ZERO_ONLY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.RReLU)
_DYNAMIC_MODULES = (nn.AlphaDropout, nn.FeatureAlphaDropout)


def module_kind(m: nn.Module) -> str:
    if isinstance(m, _CONST_MODULES):
        return "const"
    if isinstance(m, _ZERO_ONLY_MODULES):
        return "zero_only"
    if isinstance(m, _DYNAMIC_MODULES):
        return "dynamic"
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) and m.count_include_pad and m.padding not in (
        0, (0,), (0, 0), (0, 0, 0)
    ):
        return "zero_only"  # zero-padded border averages a constant with zeros
    return "keep"


class PassthroughRule(ModuleRule):
    """Parameter-free modules that act on each channel separately (activations, pooling, dropout, ...)."""

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        v = input_value(ctx, node)
        if v is None:
            ctx.opaque(node, f"'{node.target}' reads an input pare cannot follow")
            return
        ctx.values[node] = v.with_removed(transform(v.removed, module_kind(m)))


class SoftmaxModuleRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        v = input_value(ctx, node)
        tm = ctx.tensor_meta(node.args[0]) if node.args else None
        dim = getattr(m, "dim", None)
        if v is None or tm is None or dim is None or norm_dim(dim, tm.ndim) == 1:
            ctx.opaque(node, f"softmax '{node.target}' mixes channels")
            return
        ctx.values[node] = v.with_removed(worst(v.removed, CONST))  # softmax of zeros is uniform


def _unary(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0]) if node.args else None
    if v is None:
        ctx.opaque(node, f"'{node.name}' ({node.target}) reads a tensor pare cannot follow")
        return
    name = ops.canonical_name(node.op, node.target) or ""
    kind = unary_kind(name)
    if name.startswith("avg_pool") and arg(node, 3, "padding", 0) not in (0, (0,), (0, 0), (0, 0, 0)):
        kind = "zero_only" if arg(node, 5, "count_include_pad", True) else kind
    ctx.values[node] = v.with_removed(transform(v.removed, kind))


def _param_layout(ctx: Context, node: fx.Node, dim: int, size: int) -> Layout:
    key = (str(node.target), dim)
    if key not in ctx.param_layouts:
        owner, _, name = str(node.target).rpartition(".")
        layout = ctx.part.new_layout(size, "param", owner)
        ctx.param_layouts[key] = layout
        ctx.uses.append(Use(owner, name, dim, layout, 1, "param"))
    return ctx.param_layouts[key]


ADDITIVE = frozenset({"add", "sub", "rsub"})
DIVISION = frozenset({"div", "truediv", "floordiv", "true_divide"})


def _binary_state(name: str, node: fx.Node, channel: list[tuple[fx.Node, str]], spread: bool,
                  scalar_const: bool) -> str:
    """Removed-channel state of a binary op's output. ``channel``: (operand, state) of the operands that carry
    the channels; ``spread``: a batched operand broadcast over channels (input-dependent); ``scalar_const``: a
    non-zero number or non-batched tensor added to every channel."""
    states = [s for _, s in channel]
    if name == "mul":
        state = ZERO if ZERO in states else worst(*states)
        return DYNAMIC if spread and state != ZERO else state
    if name in DIVISION:
        first = node.args[0] if node.args else None
        if not channel or channel[0][0] is not first or len(channel) > 1:
            return DYNAMIC  # a removed (zero) channel in a denominator
        return DYNAMIC if spread and states[0] != ZERO else states[0]
    if spread:
        return DYNAMIC
    state = worst(*states)
    if name in ADDITIVE:
        return worst(state, CONST) if scalar_const else state
    return worst(state, CONST)  # maximum, where, comparisons, ...: assume f(0, 0) may be non-zero


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
    name = ops.canonical_name(node.op, node.target) or ""
    channels = out.shape[1]
    result: Value | None = None
    pending: list[tuple[fx.Node, int, Layout]] = []
    channel: list[tuple[fx.Node, str]] = []
    spread = False
    scalar_const = any(isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0
                       for a in (*node.args, *node.kwargs.values()))
    for a in flat_nodes((node.args, node.kwargs)):
        tm = ctx.tensor_meta(a)
        if tm is None:
            continue
        aligned = tm.ndim - out.ndim + 1
        if aligned < 0 or tm.shape[aligned] == 1:
            # broadcast along channels: couples nothing, but adds the same value to a removed channel
            spread = spread or tm.batched
            scalar_const = scalar_const or not tm.batched
            continue
        if tm.shape[aligned] != channels:
            ctx.opaque(node, f"'{node.name}' ({node.target}) combines tensors in a way pare cannot follow")
            return
        v = ctx.value(a)
        if tm.batched:
            if v is None or aligned != 1:
                ctx.opaque(node, f"'{node.name}' ({node.target}) combines tensors in a way pare cannot follow")
                return
            channel.append((a, v.removed))
            if result is None:
                result = v
            elif v.expand != result.expand:
                ctx.opaque(node, f"'{node.name}' combines a flattened and an unflattened tensor")
                return
            else:
                ctx.part.unify(result.layout, v.layout)
        elif a.op == "get_attr" and not str(a.target).startswith("_tensor_constant"):
            pending.append((a, aligned, _param_layout(ctx, a, aligned, channels)))
        else:
            ctx.opaque(node, f"'{node.name}' uses a computed per-channel constant")
            return
    if result is None:
        ctx.values[node] = ctx.fresh(node, "opaque", node.name, f"'{node.name}' has no traced channel input")
        return
    for a, dim, layout in pending:
        if result.expand != 1:
            ctx.opaque(node, f"'{node.name}' combines a flattened tensor with a parameter")
            return
        ctx.part.unify(result.layout, layout)
        if name in ADDITIVE:
            ctx.additive_params.add((str(a.target), dim))  # a bias: zeroed with the channel
        elif name != "mul":
            scalar_const = True  # a parameter that is not zeroed with the channel
    ctx.values[node] = result.with_removed(_binary_state(name, node, channel, spread, scalar_const))


def _reduce(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0]) if node.args else None
    src = ctx.tensor_meta(node.args[0]) if node.args else None
    out = ctx.meta.get(node)
    if v is None or src is None:
        ctx.opaque(node, f"'{node.name}' reduces a tensor pare cannot follow")
        return
    dims = arg(node, 1, "dim", None)
    if dims is None or not isinstance(out, TensorMeta):
        ctx.opaque(node, f"'{node.name}' reduces over every dimension")
        return
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        ctx.opaque(node, f"'{node.name}' reduces over computed dimensions")
        return
    dims = [norm_dim(d, src.ndim) for d in dims]
    if 0 in dims or 1 in dims or v.expand != 1:
        ctx.opaque(node, f"'{node.name}' reduces over the channel or batch dimension")
        return
    name = ops.canonical_name(node.op, node.target)
    ctx.values[node] = v.with_removed(worst(v.removed, CONST) if name in ("prod", "logsumexp") else v.removed)


def _max_min(ctx: Context, node: fx.Node) -> None:
    tensor_args = [a for a in flat_nodes(node.args) if ctx.tensor_meta(a) is not None]
    if len(tensor_args) >= 2:
        _binary(ctx, node)
    else:
        ctx.opaque(node, f"'{node.name}' ({node.target}) reduces or indexes values")


def _softmax(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    dim = arg(node, 1, "dim")
    if v is None or src is None or not isinstance(dim, int) or norm_dim(dim, src.ndim) == 1:
        ctx.opaque(node, f"'{node.name}' ({node.target}) mixes channels")
        return
    ctx.values[node] = v.with_removed(worst(v.removed, CONST))


def _normalize(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    dim = arg(node, 2, "dim", 1)
    if v is None or src is None or not isinstance(dim, int) or norm_dim(dim, src.ndim) == 1:
        ctx.opaque(node, f"'{node.name}' (normalize) mixes channels")
        return
    ctx.values[node] = v


def _no_tensor(ctx: Context, node: fx.Node) -> None:
    ctx.values[node] = None


register_module((nn.Softmax, nn.LogSoftmax, nn.Softmin), SoftmaxModuleRule(), first=False)
register_module(
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
    first=False,
)
register_function(ops.UNARY, _unary)
register_function(ops.BINARY, _binary)
register_function(ops.REDUCE, _reduce)
register_function(("max", "min"), _max_min)
register_function(("softmax", "log_softmax"), _softmax)
register_function(("normalize",), _normalize)
register_function(("size", "dim", "getattr"), _no_tensor)

#: Per-channel module and function kinds that ``ChannelGraph.feature_node`` walks through.
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (
    _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.PReLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
    nn.Hardswish, nn.Hardtanh, nn.ELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Identity,
)
#: Per-channel module and function kinds that ``ChannelGraph.feature_node`` walks through.
PER_CHANNEL_FUNCTIONS = frozenset(
    {"relu", "relu6", "gelu", "silu", "hardswish", "hardtanh", "leaky_relu", "elu", "mish", "sigmoid", "tanh", "add"}
)
