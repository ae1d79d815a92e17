"""Models pruned elsewhere: recover which channels another tool removed, so pare's repairs can run on them.

A user may bring a model pruned by another tool (Torch-Pruning, a hand-written script) and want pare's BN
recalibration and least-squares compensation on it, or a benchmark may need to give another tool's output the same
repair as pare's. Compensation needs to know, for every group of coupled channels, which channels survived.
:func:`infer_removals` recovers that from the two models' parameters alone, then proves it: pare's own surgery with
the recovered removals must rebuild a model whose ``state_dict`` equals the foreign one, tensor for tensor (shapes
and values), so a wrong match can never slip through.

How channels are matched (this project's design): a pruning tool that removes whole channels copies the surviving
slices of every parameter unchanged and keeps their order. So along a normalisation layer's channel dimension the
surviving channels are an increasing subsequence of the original ones with identical per-channel vectors
``(weight, bias, running_mean, running_var)``; along a producer's filter dimension, the surviving filters are the
original rows restricted to the surviving input channels. Matching is greedy and monotone (the earliest original
channel with an identical vector), which is exact whenever no two channels of a layer are identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pare.errors import PruneError
from pare.graph import ChannelGraph, Group, trace

Key = tuple[str, str, int]  # (module path, parameter name, dim)


def _monotone_match(original: torch.Tensor, pruned: torch.Tensor) -> list[int] | None:
    """Indices ``k_0 < k_1 < ...`` with ``pruned[j] == original[k_j]`` for every row ``j`` (rows along dim 0).

    Returns None when no such increasing assignment exists.
    """
    kept: list[int] = []
    k = 0
    n = original.shape[0]
    for j in range(pruned.shape[0]):
        row = pruned[j]
        while k < n and not torch.equal(original[k], row):
            k += 1
        if k == n:
            return None
        kept.append(k)
        k += 1
    return kept


def _norm_signature(module: nn.Module) -> torch.Tensor | None:
    """Per-channel vectors of a normalisation layer: its 1-D parameters and buffers stacked as columns."""
    cols = [t.detach().reshape(-1) for name, t in list(module.named_parameters(recurse=False))
            + list(module.named_buffers(recurse=False)) if t.dim() == 1 and name != "num_batches_tracked"]
    if not cols or any(c.numel() != cols[0].numel() for c in cols):
        return None
    return torch.stack([c.to(torch.float64) for c in cols], dim=1)


class _Matcher:
    """Kept positions along each (module, param, dim) that a group's members touch, found one dim at a time."""

    def __init__(self, original: nn.Module, pruned: nn.Module) -> None:
        self.original = original
        self.pruned = pruned
        self.kept: dict[tuple[str, int], list[int]] = {}  # (module, dim) -> kept positions, original coordinates

    def _modules(self, path: str) -> tuple[nn.Module, nn.Module] | None:
        try:
            return self.original.get_submodule(path), self.pruned.get_submodule(path)
        except AttributeError:
            return None

    def norm_dim(self, path: str) -> list[int] | None:
        if (path, 0) in self.kept:
            return self.kept[(path, 0)]
        pair = self._modules(path)
        if pair is None:
            return None
        a, b = (_norm_signature(m) for m in pair)
        # Identical channel vectors (an untrained BN: all (1, 0, 0, 1)) make the match ambiguous: leave the
        # decision to the filters then.
        if a is None or b is None or torch.unique(a, dim=0).shape[0] != a.shape[0]:
            return None
        kept = _monotone_match(a, b)
        if kept is not None:
            self.kept[(path, 0)] = kept
        return kept

    def filter_dim(self, path: str, in_kept: Sequence[int] | None) -> list[int] | None:
        """Kept filters of a conv/linear: original rows restricted to ``in_kept`` input positions (all if None)."""
        if (path, 0) in self.kept:
            return self.kept[(path, 0)]
        pair = self._modules(path)
        if pair is None:
            return None
        a, b = (getattr(m, "weight", None) for m in pair)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 2:
            return None
        a = a.detach()
        if in_kept is not None and a.shape[1] != b.shape[1]:
            a = a[:, list(in_kept)]
        if a.shape[1:] != b.shape[1:]:
            return None
        kept = _monotone_match(a, b.detach())
        if kept is not None:
            self.kept[(path, 0)] = kept
        return kept


def _group_kept(graph: ChannelGraph, group: Group, matcher: _Matcher, removed: dict[str, list[int]]
                ) -> list[int] | None:
    """Surviving channel indices of ``group`` (in ``range(group.size)``), or None when not yet decidable."""

    def from_positions(member_offset: int, stride: int, kept_positions: Sequence[int]) -> list[int]:
        have = set(kept_positions)
        return [i for i in range(group.size) if member_offset + i * stride in have]

    for m in group.members:
        if m.role == "norm" and m.dim == 0:
            kept = matcher.norm_dim(m.module)
            if kept is not None:
                return from_positions(m.offset, m.stride, kept)
    for m in group.members:
        if m.role != "out" or m.param != "weight" or m.dim != 0:
            continue
        in_kept = _input_positions(graph, m.module, matcher, removed)
        if in_kept is False:
            continue
        kept = matcher.filter_dim(m.module, in_kept if isinstance(in_kept, list) else None)
        if kept is not None:
            return from_positions(m.offset, m.stride, kept)
    return None


def _input_positions(graph: ChannelGraph, module: str, matcher: _Matcher, removed: dict[str, list[int]]
                     ) -> list[int] | bool | None:
    """Kept input positions of ``module`` (dim 1 of its weight) in original coordinates; None when its input
    lost nothing; False when a group feeding it is not resolved yet."""
    mod = graph.gm.get_submodule(module)
    weight = getattr(mod, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    lost: set[int] = set()
    for g in graph.groups:
        for m in g.members:
            if m.module == module and m.param == "weight" and m.dim == 1 and m.role == "in":
                if not g.prunable:  # model inputs and other frozen channels never go (checked at the end)
                    continue
                if g.id not in removed:
                    return False
                for i in removed[g.id]:
                    lost.update(range(m.offset + i * m.stride, m.offset + (i + 1) * m.stride))
    if not lost:
        return None
    return [p for p in range(weight.shape[1]) if p not in lost]


def infer_removals(
    original: nn.Module,
    pruned: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    graph: ChannelGraph | None = None,
) -> tuple[ChannelGraph, dict[str, list[int]]]:
    """Recover which channels of ``original`` are gone in ``pruned`` (a model pruned by any tool).

    Args:
        original: the dense model (only read). ``pruned``: the same architecture with whole channels removed and
            every surviving parameter slice unchanged (as Torch-Pruning leaves it, before any repair or training);
            module paths must be the same in both.
        example_inputs: inputs for tracing ``original`` (e.g. ``torch.randn(1, 3, 32, 32)``).
        graph: ``pare.trace(original, example_inputs)`` when already at hand.

    Returns:
        ``(graph, removals)``: the trace of ``original`` and, per group id with removed channels, the sorted removed
        indices, ready for :func:`pare.compensate.compensate` or ``graph.prune``.

    Raises:
        PruneError: a group whose surviving channels cannot be matched, removals in a group pare keeps frozen, or
            pare's surgery with the recovered removals does not reproduce ``pruned``'s state_dict exactly (the
            message names the first differing tensor).

    Source: this project's design (see the module docstring).
    """
    graph = graph if graph is not None else trace(original, example_inputs)
    matcher = _Matcher(original, pruned)
    removed: dict[str, list[int]] = {}
    pending = [g for g in graph.groups if any(m.role in ("out", "norm") for m in g.members)]
    while pending:
        progress = False
        for g in list(pending):
            kept = _group_kept(graph, g, matcher, removed)
            if kept is None:
                continue
            removed[g.id] = [i for i in range(g.size) if i not in set(kept)]
            pending.remove(g)
            progress = True
        if not progress:
            raise PruneError(f"cannot match the channels of group '{pending[0].id}' between the original and the "
                             "pruned model (were its surviving weights changed after pruning?)")
    removals = {gid: idx for gid, idx in removed.items() if idx}
    for gid in removals:
        if not graph.group(gid).prunable:
            raise PruneError(f"the pruned model removed channels of group '{gid}', which pare keeps frozen "
                             f"({graph.group(gid).reason})")
    rebuilt = graph.prune(removals, verify=False) if removals else original
    _check_same_state(rebuilt, pruned)
    return graph, removals


def _check_same_state(rebuilt: nn.Module, pruned: nn.Module) -> None:
    ours, theirs = rebuilt.state_dict(), pruned.state_dict()
    for key, value in ours.items():
        other = theirs.get(key)
        if other is None:
            raise PruneError(f"the pruned model has no tensor '{key}' that the original has")
        if other.shape != value.shape or not torch.equal(other, value):
            raise PruneError(f"pare's surgery with the recovered removals differs from the pruned model at '{key}' "
                             f"(shape {tuple(value.shape)} vs {tuple(other.shape)})")
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise PruneError(f"the pruned model has a tensor '{extra[0]}' that the original has not")
