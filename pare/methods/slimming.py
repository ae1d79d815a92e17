"""Network Slimming (Liu et al., ICCV 2017, arXiv:1708.06519); methods.md §6.1.

Sparsity training adds the L1 subgradient ``s·sign(γ)`` to every BatchNorm γ's gradient before the optimizer
step (:class:`SlimmingHook`, as ``updateBN`` in the official ``main.py``). Pruning uses one global threshold:
the value at the ``percent`` position of all sorted channel scores |γ| (``resprune.py``: ``y[int(total *
percent)]``), and removes the channels with |γ| ≤ threshold (:func:`slimming_removals`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pare.errors import ConfigError
from pare.graph import ChannelGraph
from pare.methods.fold import channel_slice
from pare.train.hooks import Hook

__all__ = ["SlimmingHook", "channel_gammas", "slimming_removals"]


class SlimmingHook(Hook):
    """Trainer hook: ``γ.grad += s·sign(γ)`` for every affine BatchNorm (or the paths in ``layers``), in
    ``after_backward``, i.e. before the optimizer step. A γ without a gradient gets ``s·sign(γ)`` as its grad."""

    def __init__(self, s: float, layers: Iterable[str] | None = None) -> None:
        if s < 0:
            raise ConfigError(f"slimming penalty s must be >= 0, got {s}")
        self.s = float(s)
        self.layers = None if layers is None else list(layers)
        self.label = "Network Slimming (Liu et al. 2017)"

    def _targets(self, model: nn.Module) -> list[_BatchNorm]:
        if self.layers is None:
            return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.affine]
        out = []
        for path in self.layers:
            m = model.get_submodule(path)
            if not isinstance(m, _BatchNorm) or not m.affine:
                raise ConfigError(f"'{path}' is not an affine BatchNorm")
            out.append(m)
        return out

    def after_backward(self, model: nn.Module) -> None:
        with torch.no_grad():
            for bn in self._targets(model):
                sub = self.s * torch.sign(bn.weight)
                if bn.weight.grad is None:
                    bn.weight.grad = sub.clone()
                else:
                    bn.weight.grad.add_(sub)


def channel_gammas(graph: ChannelGraph, model: nn.Module) -> dict[str, np.ndarray]:
    """Per prunable group with at least one affine BatchNorm, the channel score, shape (group.size,) float64.

    The score of a channel is its |γ|; in a coupled group (residual sum) with several BatchNorms it is the
    largest |γ| over them ([design]: a shared channel is removed only when every coupled BN scale is small).
    Groups without a BatchNorm scale are not scored.
    """
    out: dict[str, np.ndarray] = {}
    for g in graph.prunable_groups:
        per_bn = []
        for m in g.members:
            if m.role != "norm" or m.param != "weight":
                continue
            mod = model.get_submodule(m.module)
            if isinstance(mod, _BatchNorm) and mod.affine:
                w = mod.weight.detach().abs().double().cpu()
                per_bn.append(np.array([float(w[channel_slice(m, i)].max()) for i in range(g.size)]))
        if per_bn:
            out[g.id] = np.max(np.stack(per_bn), axis=0)
    return out


def slimming_removals(graph: ChannelGraph, model: nn.Module, percent: float) -> dict[str, list[int]]:
    """Global-threshold removals: ``threshold = sorted(all scores)[int(total·percent)]``, remove channels with
    score ≤ threshold. A group never loses all its channels: its largest-|γ| channel is kept (the official code
    would make an empty layer). Groups removable only in blocks (GroupNorm) are skipped.
    Returns group id -> sorted indices, for :meth:`ChannelGraph.prune`.
    """
    if not 0.0 <= percent < 1.0:
        raise ConfigError(f"percent must be in [0, 1), got {percent}")
    scores = {gid: s for gid, s in channel_gammas(graph, model).items() if graph.group(gid).block == 1}
    if not scores:
        return {}
    allv = np.sort(np.concatenate(list(scores.values())))
    threshold = allv[int(len(allv) * percent)]
    removals: dict[str, list[int]] = {}
    for gid, s in scores.items():
        idx = np.flatnonzero(s <= threshold)
        if idx.size == s.size:
            idx = np.delete(idx, int(np.argmax(s)))
        if idx.size:
            removals[gid] = sorted(int(i) for i in idx)
    return removals
