"""Structural operators: concatenation, split, narrow, slicing, channel padding, reshapes, permutations.

They move channels without computing on them: a removed channel keeps its state, except that zero padding of the
spatial dims makes a constant channel non-uniform (``dynamic``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pare.graph import ops
from pare.graph.layout import Layout, layout_size, slice_layout
from pare.graph.rules.base import (
    CONST,
    DYNAMIC,
    Context,
    FunctionResult,
    Kept,
    ModuleRule,
    Use,
    Value,
    arg,
    clone_module,
    input_value,
    norm_dim,
    worst,
)
from pare.graph.rules.registry import register_function, register_module
from pare.graph.trace import TensorMeta
from pare.layers import ZeroPadShortcut


class FlattenModuleRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        _reshape_analyze(ctx, node)


class ZeroPadShortcutRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, ZeroPadShortcut)
        v = input_value(ctx, node)
        if v is None or v.expand != 1:
            ctx.opaque(node, f"'{node.target}' reads an input pare cannot follow")
            return
        ctx.values[node] = _pad_layout(ctx, str(node.target), v.layout, m.pad_front, m.pad_back, v.removed)

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module, keep: Kept) -> nn.Module | None:
        assert isinstance(m, ZeroPadShortcut)
        out, src = ctx.value(node), input_value(ctx, node)
        if out is None or src is None:
            return None
        front, back = _pad_counts(keep, out, src, m.pad_front, m.pad_back)
        if (front, back) == (m.pad_front, m.pad_back):
            return None
        new = clone_module(m)
        assert isinstance(new, ZeroPadShortcut)
        new.pad_front, new.pad_back = front, back
        return new


def _pad_layout(ctx: Context, owner: str, layout: Layout, front: int, back: int, removed: str) -> Value:
    """Layout after padding (positive) or cropping (negative) the channels at both ends."""
    size = layout_size(layout)
    inner = slice_layout(layout, max(0, -front), size - max(0, -back))
    pre = ctx.part.new_layout(front, "pad", owner) if front > 0 else ()
    post = ctx.part.new_layout(back, "pad", owner) if back > 0 else ()
    if pre or post:
        ctx.uses.append(Use(owner, "pad", 1, pre + post, 1, "pad"))
    return Value(pre + inner + post, 1, removed)


def _cat(ctx: Context, node: fx.Node) -> None:
    tensors = arg(node, 0, "tensors")
    out = ctx.tensor_meta(node)
    if out is None or not isinstance(tensors, (list, tuple)):
        ctx.opaque(node, f"'{node.name}' (cat) has inputs pare cannot follow")
        return
    dim = norm_dim(arg(node, 1, "dim", 0), out.ndim)
    values = [ctx.value(t) for t in tensors]
    if any(v is None for v in values) or not out.batched:
        ctx.opaque(node, f"'{node.name}' (cat) has inputs pare cannot follow")
        return
    vals: list[Value] = values  # type: ignore[assignment]
    if dim == 1:
        if len({v.expand for v in vals}) != 1:
            ctx.opaque(node, f"'{node.name}' concatenates tensors flattened differently")
            return
        ctx.values[node] = Value(tuple(s for v in vals for s in v.layout), vals[0].expand,
                                 worst(*(v.removed for v in vals)))
        return
    for v in vals[1:]:
        ctx.part.unify(vals[0].layout, v.layout)
    ctx.values[node] = vals[0].with_removed(worst(*(v.removed for v in vals)))


def _split(ctx: Context, node: fx.Node) -> None:
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    outs = ctx.meta.get(node)
    if v is None or src is None or not isinstance(outs, (tuple, list)):
        ctx.opaque(node, f"'{node.name}' splits a tensor pare cannot follow")
        return
    dim = norm_dim(arg(node, 2, "dim", 0), src.ndim)
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
        values.append(Value(slice_layout(v.layout, pos, pos + n), 1, v.removed))
        pos += n
    ctx.values[node] = values


def _split_rebuild(ctx: Context, node: fx.Node, keep: Kept) -> FunctionResult:
    items = ctx.values.get(node)
    src = ctx.tensor_meta(node.args[0])
    if not isinstance(items, list) or src is None or norm_dim(arg(node, 2, "dim", 0), src.ndim) != 1:
        return None
    old = [layout_size(v.layout) for v in items if v is not None]
    new = [keep.kept_count(v.layout) for v in items if v is not None]
    if old == new:
        return None
    return ("call_function", torch.split, (node.args[0], new), {"dim": 1})


def _source(ctx: Context, node: fx.Node, verb: str) -> tuple[Value, TensorMeta] | None:
    """The value and shape of the node's first argument, or None after freezing (``verb``: what the node does)."""
    v = ctx.value(node.args[0])
    src = ctx.tensor_meta(node.args[0])
    if v is None or src is None:
        ctx.opaque(node, f"'{node.name}' {verb} a tensor pare cannot follow")
        return None
    return v, src


def _narrow(ctx: Context, node: fx.Node) -> None:
    if (found := _source(ctx, node, "narrows")) is None:
        return
    v, src = found
    dim, start, length = (arg(node, 1, "dim"), arg(node, 2, "start"), arg(node, 3, "length"))
    if not all(isinstance(a, int) for a in (dim, start, length)):
        ctx.opaque(node, f"'{node.name}' narrows with computed bounds")
        return
    if norm_dim(dim, src.ndim) != 1:
        ctx.values[node] = v
        return
    start = start + src.shape[1] if start < 0 else start
    if v.expand != 1:
        ctx.opaque(node, f"'{node.name}' narrows a flattened tensor")
        return
    ctx.values[node] = Value(slice_layout(v.layout, start, start + length), 1, v.removed)


def _narrow_rebuild(ctx: Context, node: fx.Node, keep: Kept) -> FunctionResult:
    src = ctx.tensor_meta(node.args[0])
    v = ctx.value(node.args[0])
    if src is None or v is None or norm_dim(arg(node, 1, "dim"), src.ndim) != 1:
        return None
    start, length = arg(node, 2, "start"), arg(node, 3, "length")
    start = start + src.shape[1] if start < 0 else start
    new_start = keep.kept_count(slice_layout(v.layout, 0, start))
    new_len = keep.kept_count(slice_layout(v.layout, start, start + length))
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
    ctx.values[node] = Value(slice_layout(v.layout, start, max(start, stop)), 1, v.removed)


def _getitem_rebuild(ctx: Context, node: fx.Node, keep: Kept) -> FunctionResult:
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
    new_start = keep.kept_count(slice_layout(v.layout, 0, start))
    new_stop = new_start + keep.kept_count(slice_layout(v.layout, start, stop))
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
    pad = arg(node, 1, "pad")
    mode = arg(node, 2, "mode", "constant")
    value = arg(node, 3, "value", None)
    if v is None or src is None or not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        ctx.opaque(node, f"'{node.name}' pads a tensor pare cannot follow")
        return
    k = 2 * (src.ndim - 2)
    if any(pad[:k]) and mode == "constant":
        # Padding the spatial dims with a fixed value makes a removed channel that is not zero non-uniform.
        v = v.with_removed(DYNAMIC if value not in (None, 0, 0.0) or v.removed == CONST else v.removed)
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
    ctx.values[node] = _pad_layout(ctx, node.name, v.layout, front, back, v.removed)


def _pad_counts(keep: Kept, node_value: Value, src: Value, front: int, back: int) -> tuple[int, int]:
    size = layout_size(src.layout)
    out_size = layout_size(node_value.layout)
    new_front = (
        keep.kept_count(slice_layout(node_value.layout, 0, front)) if front > 0
        else -keep.kept_count(slice_layout(src.layout, 0, -front))
    )
    new_back = (
        keep.kept_count(slice_layout(node_value.layout, out_size - back, out_size)) if back > 0
        else -keep.kept_count(slice_layout(src.layout, size + back, size))
    )
    return new_front, new_back


def _pad_rebuild_fn(ctx: Context, node: fx.Node, keep: Kept) -> FunctionResult:
    v, src = ctx.value(node), ctx.value(node.args[0])
    stm = ctx.tensor_meta(node.args[0])
    pad = arg(node, 1, "pad")
    if v is None or src is None or stm is None:
        return None
    k = 2 * (stm.ndim - 2)
    if len(pad) <= k:
        return None
    front, back = pad[k], pad[k + 1] if len(pad) > k + 1 else 0
    new_front, new_back = _pad_counts(keep, v, src, front, back)
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
            ctx.values[node] = Value(v.layout, v.expand * rest_src, v.removed)
            return
        channels = layout_size(v.layout)
        if (
            src.ndim == 2
            and out.shape[1] == channels
            and out.shape[1] * rest_out == src.shape[1]
            and v.expand == rest_out
        ):
            ctx.values[node] = Value(v.layout, 1, v.removed)
            return
    ctx.opaque(node, f"'{node.name}' ({node.target}) reshapes the channel dimension")


def _reshape_rebuild(ctx: Context, node: fx.Node, keep: Kept) -> FunctionResult:
    name = ops.canonical_name(node.op, node.target)
    if name not in ("view", "reshape"):
        return None
    v, out = ctx.value(node), ctx.tensor_meta(node)
    if v is None or out is None:
        return None
    new_dim1 = len(keep.kept(v))
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


def _permute(ctx: Context, node: fx.Node) -> None:
    if (found := _source(ctx, node, "permutes")) is None:
        return
    v, src = found
    name = ops.canonical_name(node.op, node.target)
    if name == "permute":
        perm = node.args[1:] if not isinstance(arg(node, 1, "dims"), (tuple, list)) else arg(node, 1, "dims")
        perm = [norm_dim(p, src.ndim) for p in perm] if all(isinstance(p, int) for p in perm) else None
        keeps = perm is not None and perm[0] == 0 and perm[1] == 1
    else:
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        keeps = isinstance(a, int) and isinstance(b, int) and not (
            {norm_dim(a, src.ndim), norm_dim(b, src.ndim)} & {0, 1}
        )
    if not keeps or v.expand != 1:
        ctx.opaque(node, f"'{node.name}' ({name}) moves the channel dimension")
        return
    ctx.values[node] = v


register_module(ZeroPadShortcut, ZeroPadShortcutRule(), first=False)
register_module(nn.Flatten, FlattenModuleRule(), first=False)
register_function(ops.RESHAPE, _reshape_analyze)
register_function(("view", "reshape"), _reshape_analyze, _reshape_rebuild)
register_function(("cat", "concat", "concatenate"), _cat)
register_function(("split", "chunk"), _split, _split_rebuild)
register_function(("narrow",), _narrow, _narrow_rebuild)
register_function(("getitem",), _getitem, _getitem_rebuild)
register_function(("pad",), _pad, _pad_rebuild_fn)
register_function(("permute", "transpose"), _permute)
