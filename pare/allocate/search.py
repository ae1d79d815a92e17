"""Exact analytic cost model of a removal plan, and the search that meets a MACs/params target.

Why analytic: meeting a target needs dozens of cost evaluations; counting a physically pruned model each time
(trace + surgery + forward) is far too slow. The cost of every conv/linear layer is ``factor * prod(weight
shape)`` where ``factor`` (output positions per weight element) does not change when channels are removed, so
one dense count gives every factor and the pruned cost follows from the group members' weight-dimension
changes. ``tests/test_allocate.py`` checks the estimate against :func:`pare.count.count` on pruned models.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pare.count import Counts, count
from pare.errors import BudgetError
from pare.graph import ChannelGraph, Group

Key = tuple[str, str]  # (module path, parameter or buffer name)


@dataclass(frozen=True)
class Cost:
    """Headline MACs (under ``convention``) and parameter count (BN affine included) of one plan."""

    macs: int
    params: int


class CostModel:
    """Predicts :func:`pare.count.count`'s headline MACs and ``params`` for any ``{gid: n_remove}`` plan.

    Exact for layers that are modules (conv, linear, BN): counts from functional convs outside modules are
    treated as constant (they cannot be tied to a weight shape). ``base`` is the dense model's count.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, example_inputs: torch.Tensor | tuple,
                 convention: str = "macs", base: Counts | None = None) -> None:
        self.convention = convention
        self.base = base if base is not None else count(model, example_inputs, convention)
        shapes: dict[Key, list[int]] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            owner, _, attr = name.rpartition(".")
            if tensor.dim() > 0:
                shapes[(owner, attr)] = list(tensor.shape)
        self._keys = list(shapes)
        self._index = {k: i for i, k in enumerate(self._keys)}
        self._base_shapes = [shapes[k] for k in self._keys]
        # Parameters counted once each, as count() does (tied weights share one entry).
        seen: set[int] = set()
        self._param_keys: list[int] = []
        scalar_params = 0
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            owner, _, attr = name.rpartition(".")
            if (owner, attr) in self._index:
                self._param_keys.append(self._index[(owner, attr)])
            else:
                scalar_params += p.numel()
        self._const_params = scalar_params
        # Cost terms: (factor, key index); cost = factor * prod(shape[key]).
        terms: list[tuple[float | int, int]] = []
        constant = 0
        per_module: dict[str, list[int]] = {}
        for rec in self.base.layers:
            acc = per_module.setdefault(rec.path, [0, 0, 0])
            acc[0] += rec.macs
            acc[1] += rec.bias_adds
            acc[2] += rec.bn_elements
        chip = convention == "chip"
        for path, (macs, bias_adds, bn_elems) in per_module.items():
            parts = [(macs, "weight")]
            if chip:
                parts += [(bias_adds, "bias"), (2 * bn_elems, "running_mean" if (path, "running_mean") in
                                                   self._index else "weight")]
            for value, attr in parts:
                if value == 0:
                    continue
                idx = self._index.get((path, attr))
                if idx is None:
                    constant += value
                    continue
                numel = math.prod(self._base_shapes[idx])
                # Integer factors keep the estimate exact; a layer called on mixed shapes may need a float.
                terms.append((value // numel if value % numel == 0 else value / numel, idx))
        self._terms: list[tuple[float | int, int]] = terms
        self._constant = constant
        self._group_members: dict[str, list[tuple[int, int, int]]] = {}
        for g in graph.groups:
            members = []
            for m in g.members:
                idx = self._index.get((m.module, m.param))
                if idx is not None:
                    members.append((idx, m.dim, m.stride))
            self._group_members[g.id] = members

    def cost(self, plan: Mapping[str, int]) -> Cost:
        """Predicted counts after removing ``plan[gid]`` channels from each group."""
        shapes = [list(s) for s in self._base_shapes]
        for gid, n in plan.items():
            if n <= 0:
                continue
            for idx, dim, stride in self._group_members[gid]:
                shapes[idx][dim] -= n * stride
        macs = self._constant + sum(f * math.prod(shapes[i]) for f, i in self._terms)
        params = self._const_params + sum(math.prod(shapes[i]) for i in self._param_keys)
        return Cost(round(macs), int(params))

    def reduction(self, plan: Mapping[str, int], metric: str) -> float:
        """Fraction of the dense ``metric`` ("macs" or "params") that ``plan`` removes."""
        c = self.cost(plan)
        if metric == "macs":
            return 1.0 - c.macs / self.base.macs
        return 1.0 - c.params / self.base.params


def floor_allowed(allowed: Sequence[int], desired: int) -> int:
    """The largest allowed removal count not above ``desired`` (``allowed`` ascending, starting at 0)."""
    best = 0
    for a in allowed:
        if a > desired:
            break
        best = a
    return best


def plan_at(order: Sequence[str], j: int, allowed: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The plan after the first ``j`` events of ``order`` (each event asks one more channel of its group)."""
    desired: dict[str, int] = {}
    for gid in order[:j]:
        desired[gid] = desired.get(gid, 0) + 1
    return {gid: floor_allowed(allowed[gid], c) for gid, c in desired.items()}


def search_order(
    order: Sequence[str],
    allowed: Mapping[str, Sequence[int]],
    reduction: Callable[[Mapping[str, int]], float],
    target: float,
    tolerance: float,
) -> tuple[dict[str, int], float]:
    """Walk a removal order until ``reduction(plan)`` reaches ``target`` within ``tolerance``.

    1. Bisection over the prefix length finds the longest prefix whose reduction stays <= target (reduction
       grows with the prefix, because every group's count only grows).
    2. The next events are then applied one by one, skipping (and freezing) any group whose next step would
       overshoot ``target + tolerance``: one channel of a heavily coupled group can weigh several points of
       MACs (a ResNet-56 stage-1 residual channel is ~2%), so a plain prefix may jump over the window.

    3. If that misses the window, :func:`refine` adjusts one or two groups' counts around the plan.

    Returns the plan and its reduction. Raises BudgetError when no plan it tried lands within the window; the
    search is heuristic (not exhaustive), and the error says so and gives the closest reduction found.
    """
    lo, hi = 0, len(order)
    if reduction(plan_at(order, hi, allowed)) <= target:
        lo = hi
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if reduction(plan_at(order, mid, allowed)) <= target:
                lo = mid
            else:
                hi = mid
    desired: dict[str, int] = {}
    for gid in order[:lo]:
        desired[gid] = desired.get(gid, 0) + 1
    plan = {gid: floor_allowed(allowed[gid], c) for gid, c in desired.items()}
    current = reduction(plan)
    frozen: set[str] = set()
    for gid in order[lo:]:
        if current >= target:
            break
        if gid in frozen:
            continue
        c = desired.get(gid, 0) + 1
        n = floor_allowed(allowed[gid], c)
        if n == plan.get(gid, 0):
            desired[gid] = c
            continue
        trial = {**plan, gid: n}
        value = reduction(trial)
        if value <= target + tolerance:
            desired[gid], plan, current = c, trial, value
        else:
            frozen.add(gid)
    if abs(current - target) > tolerance:
        plan, current = refine(plan, allowed, reduction, target, tolerance)
        if abs(current - target) > tolerance:
            raise BudgetError(
                f"cannot reach a reduction of {target:.4f} within {tolerance:.4f} with the allowed groups "
                f"(closest found: {current:.4f}); the search is heuristic (a removal order, then one- and two-group "
                "adjustments), so a plan may still exist: relax the constraints, the tolerance or the target"
            )
    return {gid: n for gid, n in plan.items() if n > 0}, current


def _closest_count(base: Mapping[str, int], gid: str, counts: Sequence[int],
                   reduction: Callable[[Mapping[str, int]], float], target: float) -> tuple[int, float]:
    """The allowed count of ``gid`` (others as in ``base``) whose reduction is closest to ``target``.

    Bisection: with the other groups fixed, the reduction grows with one group's count."""
    lo, hi = 0, len(counts) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reduction({**base, gid: counts[mid]}) <= target:
            lo = mid
        else:
            hi = mid
    options = [(abs(reduction({**base, gid: counts[i]}) - target), i) for i in {lo, hi}]
    _, best = min(options)
    value = reduction({**base, gid: counts[best]})
    return counts[best], value


def refine(plan: Mapping[str, int], allowed: Mapping[str, Sequence[int]],
           reduction: Callable[[Mapping[str, int]], float], target: float, tolerance: float,
           max_evaluations: int = 20000) -> tuple[dict[str, int], float]:
    """Adjust a plan that missed the window: set one group's count to the allowed value closest to the target
    (from ``plan`` and from the empty plan), then pairs (one group moved a few allowed steps around its count, a
    second group bisected). Returns the first plan inside ``target +- tolerance``, else the closest one tried.

    Why: a prefix of one removal order moves in steps of whole groups' costs; a coupled group's single channel can
    weigh more than the window, while other counts of the same groups land inside it (issue #12, a NAFNet-style
    model with 79 plans in the window and none on the order's path). ``max_evaluations`` bounds the cost model
    calls (each costs microseconds) for very large graphs."""
    evaluations = 0
    best: tuple[float, dict[str, int], float] = (abs(reduction(plan) - target), dict(plan), reduction(plan))

    def counted(p: Mapping[str, int]) -> float:
        nonlocal evaluations, best
        evaluations += 1
        value = reduction(p)
        if abs(value - target) < best[0]:
            best = (abs(value - target), dict(p), value)
        return value

    def done() -> bool:
        return best[0] <= tolerance or evaluations > max_evaluations

    gids = [g for g in allowed if len(allowed[g]) > 1]
    for base in (dict(plan), {}):
        for gid in gids:
            _closest_count(base, gid, allowed[gid], counted, target)
            if done():
                return best[1], best[2]
    for gid in gids:
        counts = list(allowed[gid])
        here = counts.index(plan.get(gid, 0)) if plan.get(gid, 0) in counts else 0
        for step in (-1, 1, -2, 2, -3, 3):
            if not 0 <= here + step < len(counts):
                continue
            moved = {**plan, gid: counts[here + step]}
            for other in gids:
                if other != gid:
                    _closest_count(moved, other, allowed[other], counted, target)
                    if done():
                        return best[1], best[2]
    return best[1], best[2]


def ratio_shortfall(groups: Sequence[Group], plan: Mapping[str, int], ratio: float, tolerance: float) -> str | None:
    """A note when the allowed counts (``round_to``, ``min_channels``, GroupNorm blocks) keep a channel-ratio plan
    more than ``tolerance`` (a fraction of all channels) below ``ratio``; None when it is close enough."""
    total = sum(g.size for g in groups)
    removed = sum(plan.values())
    if not total or removed / total >= ratio - tolerance:
        return None
    short = [g.id for g in groups if plan.get(g.id, 0) < int(ratio * g.size)]
    listed = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
    return (f"channel_ratio {ratio:.3f} asked but {removed / total:.3f} of the channels removed: the allowed counts "
            f"(round_to, min_channels, GroupNorm blocks) of {len(short)} group(s) fall short ({listed})")


def report_ratio_shortfall(groups: Sequence[Group], plan: Mapping[str, int], ratio: float,
                           tolerance: float) -> list[str]:
    """:func:`ratio_shortfall` as a list of notes for ``PruneResult.notes``, also issued as a warning."""
    note = ratio_shortfall(groups, plan, ratio, tolerance)
    if note is None:
        return []
    warnings.warn(f"pare: {note}", stacklevel=3)
    return [note]


def describe_groups(groups: Sequence[Group]) -> str:
    return ", ".join(g.id for g in groups)
