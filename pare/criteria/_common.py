"""Helpers shared by the criteria: reading a group's filters and norm parameters out of the model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pare.errors import ConfigError
from pare.graph import Group, Member

from .base import ScoreContext, aggregate


def member_slices(model: nn.Module, member: Member, size: int) -> torch.Tensor:
    """The group's channels of ``member``'s tensor, moved to dim 0 and flattened.

    Shape: (size, stride * prod(other dims)), float64, detached. Row ``i`` holds channel ``i``'s slice
    ``[offset + i*stride, offset + (i+1)*stride)`` along ``member.dim`` together with all other dims.
    """
    t = getattr(model.get_submodule(member.module), member.param).detach()
    t = t.narrow(member.dim, member.offset, size * member.stride).movedim(member.dim, 0)
    return t.reshape(size, -1).to(torch.float64)


def producer_weights(model: nn.Module, group: Group) -> list[tuple[Member, torch.Tensor]]:
    """Per producer module, its filters for the group: (member, (size, fan_in * kh * kw)) float64."""
    out: list[tuple[Member, torch.Tensor]] = []
    for m in group.producers():
        if m.param == "weight":
            out.append((m, member_slices(model, m, group.size)))
    if not out:
        raise ConfigError(f"group '{group.id}' has no producer weight to score")
    return out


def whole_producer_weight(model: nn.Module, member: Member, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """All filters of the producer layer (not only the group's) and the rows that are the group's channels.

    Returns (filters (C_layer, k) float64, rows (size,) int64), for criteria defined over a whole layer (FPGM's
    geometric median) when a group holds only part of a layer, e.g. one side of a padded residual shortcut.
    """
    if member.stride != 1:
        return member_slices(model, member, size), np.arange(size, dtype=np.int64)
    w = getattr(model.get_submodule(member.module), member.param).detach().movedim(member.dim, 0)
    return w.reshape(w.shape[0], -1).to(torch.float64), member.offset + np.arange(size, dtype=np.int64)


def norm_modules(group: Group) -> list[str]:
    """Module paths of the group's per-channel norms that have an affine weight, in member order."""
    seen: list[str] = []
    for m in group.members:
        if m.role == "norm" and m.param == "weight" and m.module not in seen:
            seen.append(m.module)
    return seen


def norm_param(model: nn.Module, group: Group, module: str, param: str) -> np.ndarray:
    """``param`` of norm ``module`` restricted to the group's channels, shape (group.size,) float64."""
    member = next(
        (m for m in group.members if m.role == "norm" and m.module == module and m.param == param), None
    )
    if member is None:
        raise ConfigError(f"group '{group.id}': norm '{module}' has no per-channel '{param}'")
    values = member_slices(model, member, group.size)
    if values.shape[1] != 1:
        raise ConfigError(f"group '{group.id}': '{module}.{param}' holds {values.shape[1]} values per channel")
    return values[:, 0].numpy()


def combine(ctx: ScoreContext, per_member: Sequence[np.ndarray]) -> np.ndarray:
    """Aggregate per-producer scores of shape (size,) with ``ctx.aggregate`` into one float64 (size,) array."""
    return aggregate(list(per_member), ctx.aggregate).astype(np.float64)
