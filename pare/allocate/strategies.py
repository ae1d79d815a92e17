"""Which groups may lose channels, how many each loses, and which ones (via the criterion).

Allocation produces ``{gid: n_remove}``; :func:`select_indices` turns that into channel indices with the
criterion's own :meth:`~pare.criteria.base.Criterion.select`.

* ``uniform``: every eligible group loses the same fraction of its channels (:func:`uniform_order`).
* ``global``: all channels of all eligible groups are ranked by a normalised score and the lowest go
  (:func:`global_order`).
* sparsity strings: per-producer ratios (what they mean is the model family's knowledge,
  :func:`pare.models.sparsity.producer_ratios`) turned into per-group counts (:func:`sparsity_plan`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx
from torch import nn

from pare.criteria.base import Criterion, ScoreContext
from pare.errors import BudgetError, ConfigError, PruneError
from pare.graph import ChannelGraph, Group
from pare.graph import rules as graph_rules

NORMALIZATIONS = ("mean", "max", "l2", "none")
COUPLED_POLICIES = ("min", "max", "first")
# Element-wise functions that merge two channel streams: a producer whose output reaches one of these feeds
# a residual sum (or a gate), so its channels are not block-internal.
_MERGING_FUNCTIONS = frozenset({"add", "sub", "mul", "div", "cat", "concat", "stack"})


@dataclass(frozen=True)
class Constraints:
    """Limits every allocation respects.

    ``min_channels``: channels each group keeps at least. ``round_to``: kept counts are multiples of this in
    groups of at least ``2 * round_to`` channels (smaller groups are left unrounded, as rounding would
    leave them nothing to prune). ``protected``: group ids, or module paths (a group is protected when one
    of its producers is, or lies under, a listed module). ``internal_only``: only block-internal groups
    (:func:`is_internal`).
    """

    min_channels: int = 1
    round_to: int = 1
    protected: tuple[str, ...] = field(default_factory=tuple)
    internal_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ConfigError(f"min_channels must be an int >= 1, got {self.min_channels!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be an int >= 1, got {self.round_to!r}")
        if isinstance(self.protected, str):
            object.__setattr__(self, "protected", (self.protected,))
        else:
            object.__setattr__(self, "protected", tuple(self.protected))


def _is_depthwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def producer_modules(graph: ChannelGraph, group: Group) -> list[str]:
    """Distinct modules whose filters create the group's channels, in member order.

    A depthwise conv is listed as an "out" member of the group it passes through, but it only transforms
    channels one by one (like a BN), so it is not a producer here.
    """
    out: list[str] = []
    for m in group.members:
        if m.role != "out" or m.module in out:
            continue
        if _is_depthwise(graph.gm.get_submodule(m.module)):
            continue
        out.append(m.module)
    return out


def _node_of(graph: ChannelGraph, module: str) -> fx.Node:
    return next(n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == module)


def _reaches_merge(graph: ChannelGraph, start: fx.Node) -> bool:
    """Does the producer's output flow (through per-channel ops only) into an add/cat/mul of two streams?"""
    frontier = [start]
    seen: set[fx.Node] = set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                module = graph.gm.get_submodule(str(user.target))
                if isinstance(module, graph_rules.PER_CHANNEL_MODULES) and not isinstance(
                    module, nn.modules.conv._ConvNd
                ):
                    frontier.append(user)
                continue
            if user.op in ("call_function", "call_method"):
                name, _ = graph_rules.function_rule(user)
                if name in _MERGING_FUNCTIONS:
                    tensor_args = [a for a in graph_rules._flat_nodes((user.args, user.kwargs))
                                   if graph.ctx.values.get(a) is not None]
                    if len(tensor_args) >= 2 or name in ("cat", "concat", "stack"):
                        return True
                elif name in graph_rules.PER_CHANNEL_FUNCTIONS:
                    frontier.append(user)
    return False


def is_internal(graph: ChannelGraph, group: Group) -> bool:
    """Is ``group`` block-internal ("the safe mode" of Li et al. and of the official Ye and CHIP code)?

    Definition, from the group's members and the traced graph:

    1. exactly one producer module (depthwise convs do not count, see :func:`producer_modules`): residual
       groups couple the producers of every block of a stage;
    2. no "pad" member: option-A zero-pad shortcuts tie a group to a residual stream;
    3. every consumer reads exactly this group (the "in" weight dimension holds ``size * stride`` entries),
       so no concatenation mixes it with other channels;
    4. the producer's output reaches no addition, multiplication or concatenation of two streams through
       per-channel operators (BN, activations).
    """
    if not group.prunable:
        return False
    producers = producer_modules(graph, group)
    if len(producers) != 1:
        return False
    if any(m.role == "pad" for m in group.members):
        return False
    for m in group.members:
        if m.role != "in":
            continue
        weight = getattr(graph.gm.get_submodule(m.module), m.param, None)
        if weight is None or weight.shape[m.dim] != group.size * m.stride:
            return False
    return not _reaches_merge(graph, _node_of(graph, producers[0]))


def is_protected(graph: ChannelGraph, group: Group, protected: Sequence[str]) -> bool:
    """Is the group named in ``protected`` (by id), or one of its producers (by module path or a parent)?"""
    if not protected:
        return False
    if group.id in protected:
        return True
    for module in producer_modules(graph, group) or [m.module for m in group.members if m.role == "out"]:
        for name in protected:
            if module == name or module.startswith(name + "."):
                return True
    return False


def eligible_groups(graph: ChannelGraph, constraints: Constraints) -> list[Group]:
    """Prunable groups that the constraints allow to lose channels, in graph order."""
    known = {g.id for g in graph.groups}
    modules = {name for name, _ in graph.gm.named_modules()}
    for name in constraints.protected:
        if name not in known and name not in modules:
            raise ConfigError(f"protected entry '{name}' is neither a group id nor a module path of the model")
    out = []
    for g in graph.prunable_groups:
        if is_protected(graph, g, constraints.protected):
            continue
        if constraints.internal_only and not is_internal(graph, g):
            continue
        out.append(g)
    return out


def allowed_counts(group: Group, constraints: Constraints) -> list[int]:
    """Removal counts the constraints allow for ``group``, ascending, always starting with 0."""
    counts = [0]
    for n in range(1, group.size):
        kept = group.size - n
        if n % group.block or kept < constraints.min_channels:
            continue
        r = constraints.round_to
        if r > 1 and group.size >= 2 * r and (kept % r or kept < r):
            continue
        counts.append(n)
    return counts


def normalize_scores(scores: np.ndarray, how: str) -> np.ndarray:
    """Scale one group's scores so that groups become comparable in a global ranking.

    ``"mean"``: divide by the mean absolute score of the group (a channel is ranked by how it compares with
    its own group's average; the default, as in Torch-Pruning's ``normalizer="mean"``); ``"max"``: by the
    largest absolute score; ``"l2"``: by the L2 norm of the group's score vector; ``"none"``: raw scores
    (only meaningful when the criterion's scale is the same across layers, e.g. Taylor or BN scale).
    An all-zero group stays zero.
    """
    s = np.asarray(scores, dtype=np.float64)
    if how == "none":
        return s
    if how == "mean":
        d = float(np.abs(s).mean()) if s.size else 0.0
    elif how == "max":
        d = float(np.abs(s).max()) if s.size else 0.0
    elif how == "l2":
        d = float(np.linalg.norm(s))
    else:
        raise ConfigError(f"unknown normalisation '{how}'; choose from {', '.join(NORMALIZATIONS)}")
    return s / d if d > 0 else s


def uniform_order(groups: Sequence[Group]) -> list[str]:
    """Events of uniform pruning: group g's k-th channel goes when the common fraction reaches k / size_g.

    Any prefix of the order is the uniform allocation at some fraction (ties by graph order), which lets a
    search move one channel at a time instead of in the big steps of ``floor(size * fraction)``.
    """
    events = [(k / g.size, i, g.id) for i, g in enumerate(groups) for k in range(1, g.size)]
    events.sort()
    return [gid for _, _, gid in events]


def global_order(groups: Sequence[Group], scores: Mapping[str, np.ndarray], normalize: str) -> list[str]:
    """Events of global ranking: every channel of every group, lowest normalised score first."""
    entries: list[tuple[float, int, int, str]] = []
    for i, g in enumerate(groups):
        if g.id not in scores:
            raise PruneError(f"criterion returned no scores for group '{g.id}'")
        s = np.asarray(scores[g.id], dtype=np.float64).reshape(-1)
        if s.size != g.size:
            raise PruneError(f"criterion returned {s.size} scores for group '{g.id}' of {g.size} channels")
        ns = normalize_scores(s, normalize)
        entries.extend((float(v), i, k, g.id) for k, v in enumerate(np.sort(ns)))
    entries.sort()
    return [gid for *_, gid in entries]


def ratio_plan(groups: Sequence[Group], allowed: Mapping[str, Sequence[int]], ratio: float) -> dict[str, int]:
    """Uniform channel ratio: each group removes ``size - int(size * (1 - ratio))`` channels (the CHIP
    kept-width rule), rounded down to an allowed count."""
    from pare.allocate.search import floor_allowed

    plan = {}
    for g in groups:
        n = floor_allowed(allowed[g.id], g.size - int(g.size * (1 - ratio)))
        if n:
            plan[g.id] = n
    return plan


def select_indices(criterion: Criterion, ctx: ScoreContext, groups: Sequence[Group],
                   scores: Mapping[str, np.ndarray], plan: Mapping[str, int]) -> dict[str, list[int]]:
    """Turn counts into channel indices with ``criterion.select`` and check what it returns."""
    by_id = {g.id: g for g in groups}
    removals: dict[str, list[int]] = {}
    for gid, n in plan.items():
        if n <= 0:
            continue
        g = by_id[gid]
        idx = np.asarray(criterion.select(ctx, g, np.asarray(scores[gid], dtype=np.float64), n))
        if idx.size != n or np.unique(idx).size != n:
            raise PruneError(f"criterion selected {idx.size} distinct channels of group '{gid}', expected {n}")
        removals[gid] = sorted(int(i) for i in idx)
    return removals


# -- sparsity strings (CHIP/HRank configurations) ---------------------------------------------------------------


def sparsity_plan(
    graph: ChannelGraph,
    groups: Sequence[Group],
    ratios: Mapping[str, float],
    *,
    coupled: str = "min",
) -> tuple[dict[str, int], list[str]]:
    """Replay a CHIP/HRank sparsity string through the engine: ``({gid: n_remove}, notes)``.

    ``ratios``: producer module path -> ratio, as the model's family maps the string
    (:func:`pare.models.sparsity.producer_ratios`). Each group gets the ratio of its producers; the kept
    count is ``int(size * (1 - p))`` as in the official code. A group whose producers carry different ratios
    is a coupled residual group (option-A shortcuts tie the stem, every stage output and the zero-padded
    slices of later stages into one group): ``coupled``
    chooses ``"min"`` (the most conservative: a channel the official model keeps in any layer is kept),
    ``"max"`` or ``"first"`` (the ratio of the group's first producer). Each such group is reported in the
    notes, because the engine cannot give the stem and the stage outputs different widths the way CHIP's
    pad/crop shortcut does, so MACs can differ from ``create(name, sparsity=...)``.
    """
    if coupled not in COUPLED_POLICIES:
        raise ConfigError(f"unknown coupled policy '{coupled}'; choose from {', '.join(COUPLED_POLICIES)}")
    plan: dict[str, int] = {}
    notes: list[str] = []
    for g in groups:
        values = [ratios[m] for m in producer_modules(graph, g) if m in ratios]
        if not values:
            continue
        distinct = sorted(set(values))
        if len(distinct) == 1:
            p = distinct[0]
        else:
            p = {"min": min(values), "max": max(values), "first": values[0]}[coupled]
            notes.append(f"group '{g.id}' couples ratios {distinct}; used {p} ({coupled})")
        kept = int(g.size * (1 - p))
        if kept < 1:
            raise BudgetError(f"sparsity leaves group '{g.id}' with {kept} of {g.size} channels")
        if g.size - kept:
            plan[g.id] = g.size - kept
    return plan, notes
