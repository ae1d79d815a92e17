"""Measured latency targets: prune until the model runs ``reduction`` faster *on this device*.

MACs are a proxy: on a CPU, 2x fewer MACs rarely means 2x less time (memory-bound layers, widths that suit the
vector units badly, fixed per-layer overheads). :func:`prune_to_latency` therefore treats the MACs budget as a
knob and searches it against the measured wall time:

1. The allocation is the usual one (:func:`pare.prune` with ``Budget(macs_reduction=m)``): the criterion
   ranks channels once (scores are cached across the search) and the allocation decides how many each group
   loses for a given ``m``.
2. ``m`` is searched by a safeguarded secant method (regula falsi kept inside the bracket) on the measured
   latency reduction ``r(m) = 1 - t(m) / t(0)``. The first guess assumes latency proportional to MACs; until a
   candidate overshoots, the next guess extrapolates the secant through the origin.
3. Each candidate is timed in interleaved rounds together with the dense model
   (:func:`pare.latency.compare_latency`), so that drift in machine load cancels in the ratio. The chosen model
   is then timed once more, with twice the runs, and *that* measurement is reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pare.allocate.budget import Budget
from pare.allocate.search import CostModel
from pare.allocate.strategies import Constraints, allowed_counts, eligible_groups, is_internal
from pare.config import PruneConfig, RepairConfig
from pare.criteria.base import Criterion, ScoreContext, get_criterion
from pare.errors import BudgetError, ConfigError
from pare.graph import Group, trace
from pare.latency import BACKENDS, compare_latency
from pare.prune import Batch, PruneResult, prune

Measure = Callable[[nn.Module], float]
# Below this width of the bracket (in MACs reduction) further bisection cannot change the pruned model by more
# than about one channel step of the allocation search (its tolerance is 0.005).
_MIN_BRACKET = 0.005


class _CachedScores(Criterion):
    """Wraps a criterion so that its (possibly data-driven, expensive) scores are computed once per search.

    Group ids are stable across re-traces of the same model, so scores keyed by id stay valid. Selection is
    delegated to the wrapped criterion, which keeps criterion-specific selection rules (blocks, sampling).
    """

    summary = "scores of another criterion, computed once for a latency search"
    evidence = "not a criterion of its own"

    def __init__(self, inner: Criterion) -> None:
        self.inner = inner
        # Reported as the wrapped criterion in PruneResult.criterion; prune() checks needs_data on the instance.
        self.name = inner.name  # type: ignore[misc]
        self.needs_data = inner.needs_data  # type: ignore[misc]
        self.needs_labels = inner.needs_labels  # type: ignore[misc]
        self._scores: dict[str, np.ndarray] | None = None

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        if self._scores is None:
            self._scores = self.inner.score(ctx, groups)
        missing = [g.id for g in groups if g.id not in self._scores]
        if missing:
            # A different set of eligible groups than on the first call: score the newcomers, keep the rest.
            self._scores.update(self.inner.score(ctx, [g for g in groups if g.id in missing]))
        return {g.id: self._scores[g.id] for g in groups}

    def select(self, ctx: ScoreContext, group: Group, scores: np.ndarray, n_remove: int) -> np.ndarray:
        return self.inner.select(ctx, group, scores, n_remove)


def max_macs_reduction(
    model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...], config: PruneConfig | None = None
) -> float:
    """The largest MACs reduction (a fraction) that :func:`pare.prune.prune` can reach under ``config``.

    Every eligible group loses its largest allowed count (``min_channels``, ``round_to``, ``protected``,
    ``internal_only`` and ``convention`` of ``config``).
    """
    config = config or PruneConfig()
    graph = trace(model, example_inputs)
    internal = config.internal_only
    if internal is None:  # as pare.prune resolves it: block-internal channels when the model has any
        internal = any(is_internal(graph, g) for g in graph.prunable_groups)
    constraints = Constraints(config.min_channels, config.round_to, config.protected, internal)
    groups = eligible_groups(graph, constraints)
    if not groups:
        raise BudgetError("no prunable group is left after the constraints (protected / internal_only)")
    plan = {g.id: allowed_counts(g, constraints)[-1] for g in groups}
    cost = CostModel(model, graph, example_inputs, config.convention)
    return cost.reduction(plan, "macs")


def _next_guess(lo: tuple[float, float], hi: tuple[float, float] | None, target: float, cap: float) -> float:
    """Next MACs reduction to try, from the bracket ``lo`` (too slow) / ``hi`` (fast enough), as (m, r) pairs."""
    m_lo, r_lo = lo
    if hi is None:
        # No overshoot yet: extend the secant through (0, 0) and lo; latency rarely falls faster than MACs,
        # so this is a step forward (at least 1.2x, so a flat measurement cannot stall the search).
        guess = m_lo * target / r_lo if r_lo > 0 else 2.0 * m_lo
        return min(cap, max(guess, 1.2 * m_lo, m_lo + _MIN_BRACKET))
    m_hi, r_hi = hi
    width = m_hi - m_lo
    if r_hi > r_lo:
        guess = m_lo + (target - r_lo) * width / (r_hi - r_lo)
    else:  # noise made r non-monotone across the bracket: fall back to bisection
        guess = m_lo + width / 2
    # Stay clear of the ends so that the bracket shrinks by at least 15% per step (regula falsi can stall).
    return min(max(guess, m_lo + 0.15 * width), m_hi - 0.15 * width)


def prune_to_latency(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    reduction: float,
    criterion: str | Criterion = "l1",
    data: Sequence[Batch] | None = None,
    config: PruneConfig | None = None,
    repair: RepairConfig | None = None,
    backend: str = "eager",
    threads: int | None = None,
    tolerance: float = 0.02,
    measure: Measure | None = None,
    runs: int = 30,
    warmup: int = 5,
    rounds: int = 3,
    max_steps: int = 8,
) -> PruneResult:
    """Prune ``model`` until its measured latency on this device is ``reduction`` lower (0.4 = 40% less time).

    Args:
        model: the dense model (not modified), timed in eval mode.
        example_inputs: the batch to time and trace, e.g. ``torch.randn(1, 3, 224, 224)``: its batch size and
            resolution are the deployment setting the latency refers to.
        reduction: fraction of the dense latency to remove, in [0, 1).
        criterion, data, config, repair: as in :func:`pare.prune.prune`; the criterion's scores are computed
            once.
        backend: ``"eager"`` or ``"onnxruntime"`` (see :func:`pare.latency.measure_latency`).
        threads: intra-op threads for every measurement; None keeps the current setting.
        tolerance: accepted distance between the measured and the requested reduction (0.02 = 2 points).
        measure: ``callable(model) -> milliseconds`` replacing the timing (e.g. a deterministic latency model
            in tests, or a measurement on another device); each call must time the model it is given.
        runs, warmup, rounds: timing of each search candidate (interleaved with the dense model,
            :func:`pare.latency.compare_latency`); the final measurement uses ``2 * runs``.
        max_steps: candidates tried at most.

    Returns:
        The :class:`~pare.prune.PruneResult` of the chosen candidate with ``latency`` set to ``{"before",
        "after"`` (measurement dicts, ``median_ms`` at least), ``"measured_reduction"`` (from the final
        measurement), ``"target"``, ``"tolerance"``, ``"backend"``, ``"searched"`` (list of ``(macs_reduction,
        ms)`` per candidate, in search order) and ``"within_tolerance"``}.

    Raises:
        ConfigError: a bad argument (reduction outside [0, 1), unknown backend).
        BudgetError: the target cannot be reached: even the largest pruning the constraints allow is not fast
            enough, or no candidate within ``max_steps`` is.
    """
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not math.isfinite(reduction):
        raise ConfigError(f"reduction must be a number in [0, 1), got {reduction!r}")
    if not 0.0 <= reduction < 1.0:
        raise ConfigError(f"reduction = {reduction} is outside [0, 1) (it is the fraction of latency removed)")
    if not 0.0 < tolerance < 1.0:
        raise ConfigError(f"tolerance must be in (0, 1), got {tolerance}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown latency backend '{backend}'; choose from {', '.join(BACKENDS)}")
    if max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, got {max_steps}")
    crit = get_criterion(criterion)
    if crit.needs_data and data is None:
        raise ConfigError(f"criterion '{crit.name}' needs calibration data: pass data=[(images, labels), ...]")
    cached = _CachedScores(crit)
    timing = {"backend": backend, "threads": threads, "warmup": warmup, "rounds": rounds}

    def timed_pair(candidate: nn.Module, n_runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(dense, candidate) measurement dicts; interleaved so that load drift hits both alike."""
        if measure is not None:
            return {"median_ms": float(measure(model))}, {"median_ms": float(measure(candidate))}
        res = compare_latency({"dense": model, "pruned": candidate}, example_inputs, runs=n_runs, **timing)
        return res["dense"].to_dict(), res["pruned"].to_dict()

    def reduction_of(dense: dict[str, Any], pruned: dict[str, Any]) -> float:
        return 1.0 - pruned["median_ms"] / dense["median_ms"]

    cap = max_macs_reduction(model, example_inputs, config)
    searched: list[tuple[float, float]] = []
    lo: tuple[float, float] = (0.0, 0.0)
    hi: tuple[float, float] | None = None
    best: PruneResult | None = None  # within tolerance
    fastest_over: tuple[float, PruneResult] | None = None  # smallest overshoot beyond tolerance
    m = min(float(reduction), cap)
    for _ in range(max_steps):
        result = prune(model, example_inputs, criterion=cached, target=Budget(macs_reduction=m), data=data,
                       config=config, repair=repair)
        dense_t, cand_t = timed_pair(result.model, runs)
        r = reduction_of(dense_t, cand_t)
        searched.append((result.macs_reduction, cand_t["median_ms"]))
        if abs(r - reduction) <= tolerance or reduction == 0.0:
            best = result  # a zero target is met by the unpruned plan whatever the timing noise says
            break
        if r < reduction:
            if m >= cap:
                raise BudgetError(
                    f"cannot cut latency by {reduction:.1%}: the largest pruning the constraints allow "
                    f"({cap:.1%} of MACs) measures {r:.1%} faster on this device; lower the target or relax "
                    "min_channels / round_to / protected"
                )
            lo = (result.macs_reduction, r)
        else:
            hi = (result.macs_reduction, r)
            if fastest_over is None or r < fastest_over[0]:
                fastest_over = (r, result)
        if hi is not None and hi[0] - lo[0] < _MIN_BRACKET:
            break
        m = _next_guess(lo, hi, float(reduction), cap)
    notes: list[str] = []
    if best is None:
        if fastest_over is None:
            raise BudgetError(
                f"no pruned model measured {reduction:.1%} faster within {max_steps} steps (best: "
                f"{lo[1]:.1%} at {lo[0]:.1%} of MACs); raise max_steps or lower the target"
            )
        # Latency moves in steps (channel widths, kernels): the closest candidate that is fast enough.
        best = fastest_over[1]
        notes.append(f"no candidate within ±{tolerance:.1%} of the target; kept the smallest overshoot")
    before, after = timed_pair(best.model, 2 * runs)
    measured = reduction_of(before, after)
    best.latency = {
        "before": before,
        "after": after,
        "measured_reduction": measured,
        "target": float(reduction),
        "tolerance": tolerance,
        "within_tolerance": abs(measured - reduction) <= tolerance,
        "backend": backend if measure is None else "custom",
        "searched": searched,
    }
    best.notes.extend(notes)
    return best
