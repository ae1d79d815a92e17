"""Per-channel modules with state: BatchNorm, InstanceNorm, GroupNorm, per-channel PReLU, FrozenBatchNorm2d; and
LayerNorm (which normalises over channels only when its shape covers them, then frozen)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from pare.graph.rules.base import (
    DYNAMIC,
    ZERO,
    Context,
    Kept,
    ModuleRule,
    Use,
    clone_module,
    current,
    input_value,
    set_param,
    slice_param,
)
from pare.graph.rules.registry import register_module

_STATS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones), recognised by name and buffers so that pare
    needs no torchvision import: per-channel buffers only, ``x * scale + shift`` computed in its forward."""
    return type(m).__name__ == "FrozenBatchNorm2d" and all(n in m._buffers for n in _STATS)


class PerChannelRule(ModuleRule):
    """Modules that act on each channel separately with per-channel state. Channels pass through; parameters and
    statistics are sliced. A removed channel is zeroed at the module's output (its affine parameters are zero),
    so downstream it is zero whatever reached the module."""

    def _params(self, m: nn.Module) -> list[str]:
        return [n for n in _STATS if getattr(m, n, None) is not None]

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        path = str(node.target)
        v = input_value(ctx, node)
        if v is None or v.expand != 1:
            ctx.opaque(node, f"'{path}' reads an input pare cannot follow")
            return
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            ctx.values[node] = v  # PReLU(0) = 0 and a constant stays a constant
            return
        first = path not in ctx.module_in
        ctx.module_input(path, v.layout)
        ctx.values[node] = v.with_removed(ZERO)
        ctx.masked_outputs.append(node)
        if isinstance(m, nn.GroupNorm):
            ctx.part.require_blocks(v.layout, m.num_channels // m.num_groups)
        if first:
            for name in self._params(m):
                ctx.uses.append(Use(path, name, 0, v.layout, 1, "norm"))

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module, keep: Kept) -> nn.Module | None:
        if isinstance(m, nn.PReLU) and m.num_parameters == 1:
            return None
        kept = keep.kept(ctx.value(node))
        params = self._params(m)
        if len(keep.removed(ctx.value(node))) == 0:
            return None
        new = clone_module(m)
        for name in params:
            set_param(new, name, slice_param(current(m, name), 0, kept))
        if isinstance(m, nn.GroupNorm):
            new.num_groups = len(kept) // (m.num_channels // m.num_groups)  # type: ignore[assignment]
            new.num_channels = len(kept)  # type: ignore[assignment]
        elif isinstance(m, nn.PReLU):
            new.num_parameters = len(kept)  # type: ignore[assignment]
        elif hasattr(m, "num_features"):
            new.num_features = len(kept)  # type: ignore[assignment]
        return new


class LayerNormRule(ModuleRule):
    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        assert isinstance(m, nn.LayerNorm)
        v = input_value(ctx, node)
        tm = ctx.tensor_meta(node.args[0]) if node.args else None
        if v is None or tm is None:
            ctx.opaque(node, f"'{node.target}' reads an input pare cannot follow")
            return
        if len(m.normalized_shape) >= tm.ndim - 1:
            ctx.part.freeze(v.layout, f"LayerNorm '{node.target}' normalises over channels")
        # Normalising a zero (or constant) channel over its own positions gives zero, plus the bias, which varies
        # along the normalised (non-channel) dims: not a per-channel constant.
        ctx.values[node] = v.with_removed(DYNAMIC if m.bias is not None else ZERO)


register_module((_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.PReLU), PerChannelRule(), first=False)
register_module(is_frozen_batchnorm, PerChannelRule(), first=False)
register_module(nn.LayerNorm, LayerNormRule(), first=False)
