"""``pare.prune``: trace, score, allocate, remove, verify (and optionally repair) in one call."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

# pare.criteria registers every built-in criterion on import, so that a criterion name resolves here.
import pare.criteria  # noqa: F401
from pare.allocate.budget import Budget
from pare.allocate.dispatch import AllocationRequest, allocation_order
from pare.allocate.search import CostModel, plan_at, report_ratio_shortfall, search_order
from pare.allocate.strategies import (
    Constraints,
    allowed_counts,
    eligible_groups,
    is_internal,
    ratio_plan,
    select_indices,
    sparsity_plan,
)
from pare.checks import check_finite
from pare.config import PruneConfig, RepairConfig, default_allocation, default_criterion
from pare.count import Counts, count
from pare.criteria.base import Criterion, ScoreContext, get_criterion
from pare.errors import BudgetError, ConfigError
from pare.graph import ChannelGraph, Group, trace
from pare.models.sparsity import producer_ratios
from pare.repair import repair as run_repair

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
    ``latency``: set by :func:`pare.prune_latency.prune_to_latency` (measured before/after, target, search).
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


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    criterion: str | Criterion = "auto",
    target: Budget,
    data: Sequence[Batch] | None = None,
    config: PruneConfig | None = None,
    repair: RepairConfig | None = None,
) -> PruneResult:
    """Prune ``model`` to ``target`` and return the smaller model with a record of what happened.

    Args:
        model: any traceable CNN; not modified.
        example_inputs: inputs for tracing and counting (e.g. ``torch.randn(1, 3, 32, 32)``).
        criterion: a registered name (``"l1"``, ``"chip"``, ...), a :class:`~pare.criteria.base.Criterion`, or
            ``"auto"``: the default pipeline's criterion with ``data``, l1 without
            (:data:`pare.config.DEFAULT_PIPELINE`).
        target: a :class:`Budget`. MACs/params targets are met within ``config.tolerance`` (a fraction: 0.005 =
            0.5 percentage point) by searching the allocation with an exact analytic count (see
            :mod:`pare.allocate.search`); the result is then recounted with :func:`pare.count.count`.
        data: calibration batches ``(images (N, C, H, W), labels (N,))`` for data-driven criteria and repairs
            (e.g. :func:`pare.data.calibration_batches`).
        config: every other pruning option (:class:`pare.config.PruneConfig`: allocation, constraints,
            verification, seed, counting convention, ...); None = the defaults (allocation "auto": by measured
            sensitivity with ``data``, global ranking without; block-internal channels). ``engine`` must be
            "pare" here (:func:`pare.pipeline.run` dispatches other engines).
        repair: BN recalibration and least-squares compensation on ``data`` after the surgery
            (:func:`pare.repair.repair`); None = :class:`~pare.config.RepairConfig`'s default: both, when ``data``
            is given.

    Raises:
        BudgetError: a malformed or unreachable budget. ConfigError: a data-driven criterion or a repair
        without ``data``; an engine other than "pare". PruneError: a parameter or buffer of ``model`` holds
        NaN or infinity (named).
    """
    config = config or PruneConfig()
    if not isinstance(target, Budget):
        raise BudgetError(f"target must be a pare.allocate.Budget, got {type(target).__name__}")
    if config.engine != "pare":
        raise ConfigError(f"pare.prune runs the 'pare' engine; engine '{config.engine}' runs through "
                          "pare.pipeline.run")
    if data is not None:
        data = list(data)
        if not data:
            raise ConfigError("data is empty: pass calibration batches (images, labels) or None")
    has_data = data is not None
    crit = get_criterion(default_criterion(has_data) if criterion == "auto" else criterion)
    if config.allocation == "auto":
        config = replace(config, allocation=default_allocation(has_data))
    repair = (repair or RepairConfig()).resolved(has_data)
    if crit.needs_data and data is None:
        raise ConfigError(f"criterion '{crit.name}' needs calibration data: pass data=[(images, labels), ...]")
    if repair.active and data is None:
        raise ConfigError("repair (BN recalibration / compensation) needs calibration data (data=...)")
    check_finite(model)  # else verification would report a divergence at some node instead of the cause

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    graph = trace(model, example_inputs)
    seconds["trace"] = time.perf_counter() - t0
    if config.internal_only is None:  # the default: block-internal channels when the model has any
        config = replace(config, internal_only=any(is_internal(graph, g) for g in graph.prunable_groups))
    constraints = Constraints(config.min_channels, config.round_to, config.protected, config.internal_only)

    t0 = time.perf_counter()
    counts_before = count(model, example_inputs, config.convention)
    seconds["count"] = time.perf_counter() - t0

    groups = eligible_groups(graph, constraints)
    if not groups:
        raise BudgetError("no prunable group is left after the constraints (protected / internal_only)")
    t0 = time.perf_counter()
    ctx = ScoreContext(graph=graph, model=model, data=data, aggregate=config.aggregate, seed=config.seed)
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in crit.score(ctx, groups).items()}
    seconds["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    plan, notes = _plan(model, example_inputs, graph, groups, scores, target, config, counts_before, data,
                        lambda g, n: crit.select(ctx, g, scores[g.id], n))
    removals = select_indices(crit, ctx, groups, scores, plan)
    seconds["allocate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pruned = graph.prune(removals, verify=config.verify)
    if config.reset_bn:
        _reset_norms(pruned, graph, removals)
    seconds["surgery"] = time.perf_counter() - t0

    report: dict[str, dict[str, float]] = {}
    if repair.active:
        done = run_repair(model, pruned, data or [], repair, graph=graph, removals=removals, seed=config.seed)
        seconds.update(done.seconds)
        report = done.compensation

    t0 = time.perf_counter()
    counts_after = count(pruned, example_inputs, config.convention)
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
        allocation="sparsity" if target.kind == "sparsity" else config.allocation,
        residual_mode="internal" if config.internal_only else "grouped",
        groups=summary,
        notes=notes,
        compensation=report,
    )


def _plan(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    graph: ChannelGraph,
    groups: list[Group],
    scores: dict[str, np.ndarray],
    target: Budget,
    config: PruneConfig,
    counts_before: Counts,
    data: list[Batch] | None,
    select: Callable[[Group, int], np.ndarray],
) -> tuple[dict[str, int], list[str]]:
    """``({gid: n_remove}, notes)`` meeting ``target`` under the constraints of ``config``; ``select`` gives the
    channels the criterion removes from a group (measured allocations mask exactly those)."""
    constraints = Constraints(config.min_channels, config.round_to, config.protected, config.internal_only)
    allowed = {g.id: allowed_counts(g, constraints) for g in groups}
    if target.kind == "sparsity":
        ratios = producer_ratios(model, str(target.value), config.model_name)
        return sparsity_plan(graph, groups, ratios, coupled=config.coupled)
    if target.kind == "channel_ratio":
        total = sum(g.size for g in groups)
        reduction: Callable[[Mapping[str, int]], float] = lambda p: sum(p.values()) / total  # noqa: E731
    else:
        metric = "macs" if target.kind == "macs_reduction" else "params"
        cost = CostModel(model, graph, example_inputs, config.convention, base=counts_before)
        reduction = lambda p: cost.reduction(p, metric)  # noqa: E731
    request = AllocationRequest(groups, scores, config.normalize, graph=graph, model=model,
                                example_inputs=example_inputs, data=data, allowed=allowed, select=select,
                                reduction=reduction, seed=config.seed)
    if target.kind == "channel_ratio":
        ratio = float(target.value)
        if config.allocation == "uniform":
            plan = ratio_plan(groups, allowed, ratio)  # the CHIP kept-width rule per group
        else:
            plan = plan_at(allocation_order(config.allocation, request), round(ratio * sum(g.size for g in groups)),
                           allowed)
        return plan, report_ratio_shortfall(groups, plan, ratio, config.tolerance)
    order = allocation_order(config.allocation, request)
    plan, _ = search_order(order, allowed, reduction, float(target.value), config.tolerance)
    return plan, []
