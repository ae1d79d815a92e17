"""``pare.prune``: trace, score, allocate, remove, verify (and optionally compensate) in one call."""

from __future__ import annotations

import copy
import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pare.allocate.budget import Budget
from pare.allocate.search import CostModel, plan_at, search_order
from pare.allocate.strategies import (
    Constraints,
    allowed_counts,
    eligible_groups,
    global_order,
    is_internal,
    ratio_plan,
    select_indices,
    sparsity_plan,
    uniform_order,
)
from pare.count import Counts, count
from pare.errors import BudgetError, ConfigError
from pare.graph import ChannelGraph, trace

ALLOCATIONS = ("global", "uniform", "sensitivity")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PruneResult:
    """What :func:`prune` did.

    ``removals``: group id -> removed channel indices. ``counts_before``/``counts_after``: :func:`pare.count`
    of the dense and pruned models under one convention; ``reduction``: figures computed from those absolute
    counts (:meth:`pare.count.Counts.reduction_vs`). ``seconds``: wall time per phase (trace, score,
    allocate, surgery incl. verification, compensate, recalibrate, count). ``groups``: one dict per prunable
    group (id, size, removed, eligible, internal). ``notes``: e.g. coupled groups of a sparsity replay;
    ``compensation``: per-layer errors when compensation ran; ``residual_mode``: "internal" or "grouped".
    ``latency``: set by :func:`pare.allocate.latency.prune_to_latency` (measured before/after, target, search).
    """

    model: nn.Module
    removals: dict[str, list[int]]
    counts_before: Counts
    counts_after: Counts
    reduction: dict[str, Any]
    seconds: dict[str, float]
    criterion: str
    budget: Budget
    allocation: str
    residual_mode: str
    groups: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    compensation: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, Any] | None = None

    @property
    def macs_reduction(self) -> float:
        return float(self.reduction["macs_reduction"])

    @property
    def params_reduction(self) -> float:
        return float(self.reduction["params_reduction"])

    def summary(self) -> dict[str, Any]:
        """JSON-ready record (no model, no per-layer counts)."""
        return {
            "criterion": self.criterion,
            "budget": self.budget.describe(),
            "allocation": self.allocation,
            "residual_mode": self.residual_mode,
            "counts_before": self.counts_before.to_dict(),
            "counts_after": self.counts_after.to_dict(),
            "reduction": self.reduction,
            "seconds": self.seconds,
            "removed_channels": sum(len(v) for v in self.removals.values()),
            "groups_pruned": len(self.removals),
            "notes": self.notes,
        }


def _load_criteria() -> None:
    # The criteria register themselves when their package is imported; importing here keeps `pare.prune`
    # usable without the caller importing pare.criteria first.
    try:
        importlib.import_module("pare.criteria")
    except ImportError:
        importlib.import_module("pare.criteria.base")


def _reset_norms(pruned: nn.Module, graph: ChannelGraph, removals: dict[str, list[int]]) -> None:
    """Reset, in place, the norm layers that are members of a group with removed channels (whole layers)."""
    names: list[str] = []
    for gid, idx in removals.items():
        if len(idx):
            names += [m.module for m in graph.group(gid).members if m.role == "norm" and m.module not in names]
    for name in names:
        norm = pruned.get_submodule(name)
        if not hasattr(norm, "reset_parameters"):
            raise ConfigError(f"reset_bn: norm layer '{name}' ({type(norm).__name__}) cannot be reset")
        norm.reset_parameters()  # BatchNorm: also zeroes running mean / num_batches_tracked, running var = 1


def _sensitivity_order(model: nn.Module, groups: Sequence[Any], crit: Any, ctx: Any, scores: dict[str, np.ndarray],
                       data: Sequence[Batch] | None, cost: CostModel, metric: str) -> list[str]:
    from pare.allocate.sensitivity import sensitivity_curves, sensitivity_order

    if not data:
        raise ConfigError("allocation 'sensitivity' needs calibration data (data=...)")
    from pare.criteria.recon import ReconstructionSelection, refit_consumers

    probe = copy.deepcopy(model).eval()
    fitter = ReconstructionSelection()
    curves = sensitivity_curves(probe, groups, lambda g, n: crit.select(ctx, g, scores[g.id], n), data,
                                refit=lambda g, idx: refit_consumers(fitter, ctx, g, idx))
    saved = {}
    for g in groups:
        half = max(1, g.size // 2)
        saved[g.id] = cost.reduction({g.id: half}, metric) / half
    return sensitivity_order(groups, curves, saved)


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    criterion: Any = "l1",
    target: Budget,
    data: Sequence[Batch] | None = None,
    allocation: str = "global",
    aggregate: str = "sum",
    normalize: str = "mean",
    min_channels: int = 1,
    round_to: int = 1,
    protected: Sequence[str] = (),
    internal_only: bool = False,
    verify: bool = True,
    compensate: bool = False,
    recalibrate: int | bool | None = None,
    reset_bn: bool = False,
    seed: int = 0,
    convention: str = "macs",
    tolerance: float = 0.005,
    coupled: str = "min",
    model_name: str | None = None,
) -> PruneResult:
    """Prune ``model`` to ``target`` and return the smaller model with a record of what happened.

    Args:
        model: any traceable CNN; not modified.
        example_inputs: inputs for tracing and counting (e.g. ``torch.randn(1, 3, 32, 32)``).
        criterion: a registered name (``"l1"``, ``"chip"``, ...) or a Criterion instance.
        target: a :class:`Budget`. MACs/params targets are met within ``tolerance`` (a fraction: 0.005 = 0.5
            percentage point) by searching the allocation with an exact analytic count (see
            :mod:`pare.allocate.search`); the result is then recounted with :func:`pare.count.count`.
        data: calibration batches ``(images, labels)`` for data-driven criteria, compensation and BN
            recalibration (e.g. :func:`pare.data.calibration_batches`).
        allocation: ``"global"`` (rank all channels by normalised score, ``normalize`` = "mean"/"max"/"l2"/
            "none") or ``"uniform"`` (the same fraction of every group). Ignored for sparsity budgets.
        aggregate: how member scores of coupled groups combine ("sum", "mean", "max", "first").
        min_channels, round_to, protected, internal_only: constraints (:class:`pare.allocate.Constraints`).
        verify: check the pruned model against the masked original (raises EquivalenceError on mismatch).
        compensate: least-squares reconstruction of the consumer layers on ``data``
            (:func:`pare.compensate.compensate`, sequential solve); implies BN recalibration (before the fit)
            unless ``recalibrate=False``.
        recalibrate: BN recalibration on ``data``: an int = number of batches, True = all, None = only when
            compensating, False/0 = never.
        reset_bn: after surgery (before any recalibration), reset every norm layer of a pruned group to its
            default state (γ = 1, β = 0, running mean 0, running var 1), as the official CHIP CIFAR code does
            (methods.md §1.7 item 3); the default copies the surviving channels' slices.
        seed: passed to the criterion (random, sampling) and to compensation's position sampling.
        convention: counting convention (``"macs"`` or ``"chip"``) for the target and the reported counts.
        coupled: for sparsity budgets, how coupled residual groups take a ratio (see
            :func:`pare.allocate.sparsity_plan`).
        model_name: zoo name for sparsity budgets when the model was not built by ``pare.models.create``.

    Raises:
        BudgetError: a malformed or unreachable budget. ConfigError: a data-driven criterion, compensation or
        recalibration without ``data``; unknown options.
    """
    from pare.compensate import compensate as run_compensation
    from pare.criteria.base import ScoreContext, get_criterion
    from pare.evaluate import recalibrate_bn

    if not isinstance(target, Budget):
        raise BudgetError(f"target must be a pare.allocate.Budget, got {type(target).__name__}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation '{allocation}'; choose from {', '.join(ALLOCATIONS)}")
    if not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must be in (0, 1), got {tolerance}")
    _load_criteria()
    crit = get_criterion(criterion)
    if data is not None:
        data = list(data)
        if not data:
            raise ConfigError("data is empty: pass calibration batches (images, labels) or None")
    if crit.needs_data and data is None:
        raise ConfigError(f"criterion '{crit.name}' needs calibration data: pass data=[(images, labels), ...]")
    if compensate and data is None:
        raise ConfigError("compensate=True needs calibration data (data=...)")
    if recalibrate is None:
        recalibrate = bool(compensate)
    if recalibrate and data is None:
        raise ConfigError("BN recalibration needs calibration data (data=...)")
    constraints = Constraints(min_channels, round_to, tuple(protected), internal_only)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    graph = trace(model, example_inputs)
    seconds["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts_before = count(model, example_inputs, convention)
    seconds["count"] = time.perf_counter() - t0

    groups = eligible_groups(graph, constraints)
    if not groups:
        raise BudgetError("no prunable group is left after the constraints (protected / internal_only)")
    t0 = time.perf_counter()
    ctx = ScoreContext(graph=graph, model=model, data=data, aggregate=aggregate, seed=seed)
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in crit.score(ctx, groups).items()}
    seconds["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    allowed = {g.id: allowed_counts(g, constraints) for g in groups}
    notes: list[str] = []
    kind = target.kind
    if kind == "sparsity":
        plan, notes = sparsity_plan(graph, groups, str(target.value), model_name=model_name, coupled=coupled)
    elif kind == "channel_ratio":
        ratio = float(target.value)
        if allocation == "uniform":
            plan = ratio_plan(groups, allowed, ratio)
        else:
            order = global_order(groups, scores, normalize)
            n_events = round(ratio * sum(g.size for g in groups))
            plan = plan_at(order, n_events, allowed)
    else:
        metric = "macs" if kind == "macs_reduction" else "params"
        cost = CostModel(model, graph, example_inputs, convention, base=counts_before)
        if allocation == "sensitivity":
            order = _sensitivity_order(model, groups, crit, ctx, scores, data, cost, metric)
        elif allocation == "uniform":
            order = uniform_order(groups)
        else:
            order = global_order(groups, scores, normalize)
        plan, _ = search_order(order, allowed, lambda p: cost.reduction(p, metric), float(target.value), tolerance)
    removals = select_indices(crit, ctx, groups, scores, plan)
    seconds["allocate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pruned = graph.prune(removals, verify=verify)
    if reset_bn:
        _reset_norms(pruned, graph, removals)
    seconds["surgery"] = time.perf_counter() - t0

    report: dict[str, dict[str, float]] = {}
    batches = data or []
    n_batches = len(batches) if recalibrate is True else int(recalibrate)
    if recalibrate:
        t0 = time.perf_counter()
        recalibrate_bn(pruned, batches, batches=n_batches)
        seconds["recalibrate"] = time.perf_counter() - t0
    if compensate:
        # After a first recalibration, so that the layers are fitted on the inputs the recalibrated model produces.
        # No second recalibration: the sequential solve gives each refitted layer's BN its original statistics
        # back, and recalibrating afterwards measured worse on ResNet-56 (docs/results/oneshot.md, rows
        # "bn-recal+compensate(sequential)" vs "...+bn-recal").
        t0 = time.perf_counter()
        report = run_compensation(model, pruned, graph, removals, batches, seed=seed)
        seconds["compensate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts_after = count(pruned, example_inputs, convention)
    seconds["count"] += time.perf_counter() - t0
    reduction = counts_after.reduction_vs(counts_before)

    eligible_ids = {g.id for g in groups}
    summary = [
        {
            "id": g.id,
            "size": g.size,
            "removed": len(removals.get(g.id, [])),
            "eligible": g.id in eligible_ids,
            "internal": is_internal(graph, g),
        }
        for g in graph.prunable_groups
    ]
    return PruneResult(
        model=pruned,
        removals=removals,
        counts_before=counts_before,
        counts_after=counts_after,
        reduction=reduction,
        seconds=seconds,
        criterion=crit.name,
        budget=target,
        allocation="sparsity" if kind == "sparsity" else allocation,
        residual_mode="internal" if internal_only else "grouped",
        groups=summary,
        notes=notes,
        compensation=report,
    )

