"""Producers: convolutions and linear layers create channels (their outputs) and consume them (their inputs)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from pare.graph.rules.base import (
    Context,
    Kept,
    ModuleRule,
    Use,
    Value,
    clone_module,
    current,
    input_value,
    set_param,
    slice_param,
)
from pare.graph.rules.registry import register_module


def _conv_kind(m: _ConvNd) -> str:
    if m.groups == 1:
        return "plain"
    if m.groups == m.in_channels == m.out_channels:
        return "depthwise"
    return "grouped"


def conv_foldable(m: _ConvNd) -> bool:
    """A constant input channel adds the same amount at every output position: no zero padding, not transposed."""
    if m.transposed:
        return False
    if m.padding_mode != "zeros":
        return True
    if isinstance(m.padding, str):
        return m.padding == "valid" or all(k == 1 for k in m.kernel_size)
    return all(p == 0 for p in m.padding)


class ConvRule(ModuleRule):
    """Conv1d/2d/3d. Plain convs consume their input channels and produce a new space; depthwise convs
    (groups == in == out) pass channels through; other grouped convs are frozen."""

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, _ConvNd)
        path = str(node.target)
        v = input_value(ctx, node)
        kind = _conv_kind(m)
        if v is None or v.expand != 1 or kind == "grouped":
            ctx.opaque(node, f"grouped convolution '{path}' (groups={m.groups}) is not prunable"
                       if kind == "grouped" else f"'{path}' reads an input pare cannot follow")
            return
        ctx.module_input(path, v.layout)
        if kind == "depthwise":
            # A removed channel's depthwise filter and bias are zeroed with it: the output is zero again.
            ctx.values[node] = Value(ctx.module_in[path])
            ctx.masked_outputs.append(node)
            if path not in ctx.module_out:
                ctx.module_out[path] = ctx.module_in[path]
                ctx.uses.append(Use(path, "weight", 0, v.layout, 1, "out"))
                if m.bias is not None:
                    ctx.uses.append(Use(path, "bias", 0, v.layout, 1, "out"))
            return
        first = path not in ctx.module_out
        ctx.consumer_input(node, v, conv_foldable(m))
        out = ctx.producer_output(path, m.out_channels)
        ctx.values[node] = Value(out)
        ctx.masked_outputs.append(node)
        if first:
            in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
            ctx.uses.append(Use(path, "weight", in_dim, v.layout, 1, "in"))
            ctx.uses.append(Use(path, "weight", out_dim, out, 1, "out"))
            if m.bias is not None:
                ctx.uses.append(Use(path, "bias", 0, out, 1, "out"))

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module, keep: Kept) -> nn.Module | None:
        assert isinstance(m, _ConvNd)
        keep_in = keep.kept(input_value(ctx, node))
        keep_out = keep.kept(ctx.value(node))
        if len(keep_in) == m.in_channels and len(keep_out) == m.out_channels:
            return None
        new = clone_module(m)
        assert isinstance(new, _ConvNd)
        weight = current(m, "weight")
        if _conv_kind(m) == "depthwise":
            set_param(new, "weight", slice_param(weight, 0, keep_out))
            new.groups = new.in_channels = new.out_channels = len(keep_out)
        else:
            in_dim, out_dim = (0, 1) if m.transposed else (1, 0)
            set_param(new, "weight", slice_param(slice_param(weight, out_dim, keep_out), in_dim, keep_in))
            new.in_channels, new.out_channels = len(keep_in), len(keep_out)
        if m.bias is not None:
            set_param(new, "bias", slice_param(current(m, "bias"), 0, keep_out))
        return new


class LinearRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, nn.Linear)
        path = str(node.target)
        v = input_value(ctx, node)
        tm = ctx.tensor_meta(node.args[0]) if node.args else None
        if v is None or tm is None or tm.ndim != 2:
            ctx.opaque(node, f"'{path}' applies to a tensor whose features are not its channels")
            return
        ctx.module_input(path, v.layout)
        first = path not in ctx.module_out
        ctx.consumer_input(node, v, True)
        out = ctx.producer_output(path, m.out_features)
        ctx.values[node] = Value(out)
        ctx.masked_outputs.append(node)
        if first:
            ctx.uses.append(Use(path, "weight", 1, v.layout, v.expand, "in"))
            ctx.uses.append(Use(path, "weight", 0, out, 1, "out"))
            if m.bias is not None:
                ctx.uses.append(Use(path, "bias", 0, out, 1, "out"))

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module, keep: Kept) -> nn.Module | None:
        assert isinstance(m, nn.Linear)
        keep_in = keep.kept(input_value(ctx, node))
        keep_out = keep.kept(ctx.value(node))
        if len(keep_in) == m.in_features and len(keep_out) == m.out_features:
            return None
        new = clone_module(m)
        assert isinstance(new, nn.Linear)
        set_param(new, "weight", slice_param(slice_param(current(m, "weight"), 0, keep_out), 1, keep_in))
        if m.bias is not None:
            set_param(new, "bias", slice_param(current(m, "bias"), 0, keep_out))
        new.in_features, new.out_features = len(keep_in), len(keep_out)
        return new


register_module(_ConvNd, ConvRule(), first=False)
register_module(nn.Linear, LinearRule(), first=False)
