"""Allocation from measured layer sensitivity: how much the loss rises when a group loses channels.

A global ranking of normalised scores compares numbers that mean different things in different layers (an L1 norm in
stage 1 against one in stage 3), and a uniform ratio ignores that some layers matter more than others. Sensitivity
analysis (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, §4.2, done there by hand; made automatic
here) measures it instead: for every eligible group and a few removal fractions, the channels the criterion would
remove are masked (their producers' filters, biases and normalisation affine set to zero, which for the usual
conv -> norm -> activation chain is exactly what removing them computes) and the cross-entropy on the calibration
batches is measured. The increase over the dense loss, per group and fraction, is the group's sensitivity curve.

The allocation then spends the budget where it hurts least per MAC: each curve is interpolated to single channels
and replaced by its greatest convex minorant (so every further channel of a group costs at least as much as the
previous one), and the removal events of all groups are ordered by their marginal loss increase per MAC saved. The
order plugs into the same exact search (:func:`pare.allocate.search.search_order`) as the global and uniform
orders, so the budget is met the same way. Groups are assumed to act independently (their loss increases add up),
the usual first-order assumption of sensitivity-based allocation.

Cost: ``len(groups) * len(fractions)`` forward passes over at most ``MAX_IMAGES`` calibration images (ResNet-56,
27 block-internal groups, 4 fractions, 256 images: about two minutes on one CPU core).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError
from pare.graph import Group

if TYPE_CHECKING:
    from pare.allocate.dispatch import AllocationRequest

FRACTIONS = (0.2, 0.4, 0.6, 0.8)
MAX_IMAGES = 256  # calibration images per measurement: the curves rank groups, they need no more
Batch = tuple[torch.Tensor, torch.Tensor]
Select = Callable[[Group, int], np.ndarray]
Refit = Callable[[Group, np.ndarray], dict[str, torch.Tensor]]


@torch.no_grad()
def _loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    total, n = 0.0, 0
    for images, labels in batches:
        total += float(F.cross_entropy(model(images), labels, reduction="sum"))
        n += int(labels.numel())
    return total / max(1, n)


def _first_images(batches: Sequence[Batch], n: int) -> list[Batch]:
    out: list[Batch] = []
    for images, labels in batches:
        if n <= 0:
            break
        out.append((images[:n], labels[:n]))
        n -= int(labels.shape[0])
    return out


Saved = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (tensor view, positions, original values)


def _mask_slices(model: nn.Module, group: Group, idx: np.ndarray) -> Saved:
    """Zero the producer ("out") and normalisation-affine ("norm") slices of ``idx``; returns what to restore."""
    saved = []
    for m in group.members:
        if m.role not in ("out", "norm") or m.param not in ("weight", "bias"):
            continue
        tensor = getattr(model.get_submodule(m.module), m.param, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        pos = torch.as_tensor(
            np.concatenate([np.arange(m.offset + i * m.stride, m.offset + (i + 1) * m.stride) for i in idx]),
            dtype=torch.long,
        )
        view = tensor.data.transpose(0, m.dim) if m.dim else tensor.data
        saved.append((view, pos, view[pos].clone()))
        view[pos] = 0
    return saved


def sensitivity_curves(
    model: nn.Module,
    groups: Sequence[Group],
    select: Select,
    batches: Sequence[Batch],
    fractions: Sequence[float] = FRACTIONS,
    refit: Refit | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Loss increase per group and removal count, measured with the removed channels masked.

    Args:
        model: the dense model, in eval mode; its parameters are changed during the measurement and restored
            before returning (pass a copy when other threads use it).
        groups: the eligible groups; select: ``(group, n) -> indices`` the criterion would remove.
        batches: calibration batches ``(images (B, C, H, W), labels (B,))``; the first ``MAX_IMAGES`` images
            are used.
        fractions: removal fractions of each group to measure, in (0, 1).
        refit: ``(group, removed indices) -> {consumer module path: new weight}``: the local repair applied
            during the measurement (e.g. :func:`pare.criteria.recon.refit_consumers`, the least-squares refit
            that compensation also performs), so that the curve measures what is lost *after* repair.

    Returns:
        group id -> ``[(n_removed, loss increase in nats per image), ...]`` ascending in ``n_removed``, starting
        with ``(0, 0.0)``.

    Raises:
        ConfigError: no batches, or a fraction outside (0, 1).
    """
    if not batches:
        raise ConfigError("sensitivity allocation needs calibration batches (data=...)")
    if any(not 0 < f < 1 for f in fractions):
        raise ConfigError(f"sensitivity fractions must lie in (0, 1), got {list(fractions)}")
    batches = _first_images(batches, MAX_IMAGES)
    base = _loss(model, batches)
    curves: dict[str, list[tuple[int, float]]] = {}
    for g in groups:
        counts = sorted({n for f in fractions if 0 < (n := round(f * g.size / g.block) * g.block) < g.size})
        curve = [(0, 0.0)]
        for n in counts:
            idx = np.asarray(select(g, n))
            saved = _mask_slices(model, g, idx)
            for path, weight in (refit(g, idx) if refit else {}).items():
                tensor = model.get_submodule(path).weight.data
                saved.append((tensor, torch.arange(tensor.shape[0]), tensor.clone()))
                tensor.copy_(weight)
            try:
                curve.append((n, _loss(model, batches) - base))
            finally:
                for view, pos, values in saved:
                    view[pos] = values
        curves[g.id] = curve
    return curves


def _convex_marginals(curve: Sequence[tuple[int, float]], size: int) -> np.ndarray:
    """Marginal loss increase of the 1st, 2nd, ... removed channel (length ``size - 1``), from the greatest
    convex minorant of the piecewise-linear curve (non-decreasing marginals)."""
    xs = np.array([n for n, _ in curve], dtype=np.float64)
    ys = np.maximum.accumulate(np.array([v for _, v in curve], dtype=np.float64))
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    grid = np.arange(size, dtype=np.float64)
    hx, hy = xs[hull], ys[hull]
    # Beyond the last measured count, extend with the last slope (at least as steep as every earlier one).
    slope = (hy[-1] - hy[-2]) / (hx[-1] - hx[-2]) if len(hull) >= 2 else 0.0
    values = np.where(grid <= hx[-1], np.interp(grid, hx, hy), hy[-1] + slope * (grid - hx[-1]))
    return np.diff(values)


def sensitivity_order(
    groups: Sequence[Group],
    curves: Mapping[str, Sequence[tuple[int, float]]],
    saved_per_channel: Mapping[str, float],
) -> list[str]:
    """Removal events of every group ordered by marginal loss increase per unit of cost saved.

    ``saved_per_channel``: group id -> cost (MACs or params, any unit) one removed channel saves (> 0).
    Returns group ids, one per event, as :func:`pare.allocate.strategies.global_order` does.
    """
    events: list[tuple[float, int, int, str]] = []
    for i, g in enumerate(groups):
        marg = _convex_marginals(curves[g.id], g.size)
        unit = max(float(saved_per_channel.get(g.id, 0.0)), 1e-12)
        events.extend((float(v) / unit, i, k, g.id) for k, v in enumerate(marg))
    events.sort()
    return [gid for *_, gid in events]


def sensitivity_allocation(request: AllocationRequest) -> list[str]:
    """The allocation table's entry: curves measured on a copy of ``request.model`` with the consumers' least-squares
    refit (:func:`pare.criteria.recon.refit_consumers`), ordered per unit of the budget's reduction.

    Raises:
        ConfigError: the request lacks the model, calibration data, the criterion's selection or the budget's
            reduction function (:func:`pare.prune` provides all of them).
    """
    from pare.criteria.base import ScoreContext
    from pare.criteria.recon import ReconstructionSelection, refit_consumers

    if not request.data:
        raise ConfigError("allocation 'sensitivity' needs calibration data (data=...)")
    if request.model is None or request.graph is None or request.select is None or request.reduction is None:
        raise ConfigError("allocation 'sensitivity' needs the model, its graph, the criterion's selection and the "
                          "budget's reduction (pare.prune passes them)")
    probe = copy.deepcopy(request.model).eval()
    ctx = ScoreContext(graph=request.graph, model=request.model, data=request.data, seed=request.seed)
    fitter = ReconstructionSelection()
    curves = sensitivity_curves(probe, request.groups, request.select, request.data,
                                refit=lambda g, idx: refit_consumers(fitter, ctx, g, idx))
    saved = {}
    for g in request.groups:
        half = max(1, g.size // 2)
        saved[g.id] = request.reduction({g.id: half}) / half
    return sensitivity_order(request.groups, curves, saved)
