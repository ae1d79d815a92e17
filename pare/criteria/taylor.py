"""Taylor FO-BN (Molchanov, Mallya, Tyree, Frosio, Kautz, CVPR 2019), methods.md §6.1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pare.errors import ConfigError
from pare.graph import Group

from .base import Criterion, ScoreContext, register_criterion
from .stats import feature_sites, stream_maps_with_grad


def gate_contribution(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(Σ_{n,h,w} a·∂L/∂a)² per channel: the squared gradient of a gate (= 1) on the map.

    ``act``, ``grad``: (N, C, ...) -> (C,) float64. For y = g·a with g = 1, ∂L/∂g = Σ a·∂L/∂y, summed over the
    batch and spatial positions, as in the official method 22.
    """
    dims = [d for d in range(act.dim()) if d != 1]
    return (act.to(torch.float64) * grad.to(torch.float64)).sum(dims).pow(2)


@register_criterion
class TaylorFOBN(Criterion):
    """Score of channel i: the first-order Taylor estimate of the loss change, (gate·∂L/∂gate)², per minibatch.

    The gate sits on the group's feature node. For conv-BN-ReLU groups that is the ReLU output, and because
    relu(x)·relu'(x) = relu(x), a gate after the ReLU gives exactly the same score as the official gate after BN.
    For the last conv of a residual block the feature node is the activation after the addition, so the gate acts
    on the whole residual group rather than on one branch's BN.

    Averaging (official ``pruning_engine.py``): per window of ``frequency`` minibatches the per-minibatch scores
    are averaged; windows are combined with momentum (avg ← m·avg + (1 − m)·window, the first window initialises
    it). The default ``frequency=1`` averages with momentum 0.9 across minibatches. Labels are required
    (cross-entropy on the model output, eval mode). Pruning by global ranking across layers is the allocation
    helper's job; these scores are raw (no per-layer normalisation).
    """

    name = "taylor"
    summary = "Taylor FO-BN: (gate * dL/dgate)^2 on each feature map, momentum-averaged (Molchanov et al. 2019)"
    evidence = "paper + official code (NVlabs/Taylor_pruning)"
    needs_data = True
    needs_labels = True

    def __init__(self, momentum: float = 0.9, frequency: int = 1) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"taylor momentum must be in [0, 1), got {momentum}")
        if frequency < 1:
            raise ConfigError(f"taylor frequency must be >= 1, got {frequency}")
        self.momentum = momentum
        self.frequency = frequency

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        sites = feature_sites(ctx.graph, groups)
        window: dict[str, torch.Tensor] = {}
        averaged: dict[str, torch.Tensor] = {}
        count = 0

        def flush() -> None:
            nonlocal count
            for node, total in window.items():
                contribution = total / count
                prev = averaged.get(node)
                if prev is not None:
                    contribution = self.momentum * prev + (1 - self.momentum) * contribution
                averaged[node] = contribution
            window.clear()
            count = 0

        def update(maps: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
            nonlocal count
            for node, act in maps.items():
                window[node] = window.get(node, 0) + gate_contribution(act, grads[node])
            count += 1
            if count == self.frequency:
                flush()

        stream_maps_with_grad(ctx, [s.node for s in sites.values()], update, self.name)
        if count:
            flush()
        return {gid: averaged[s.node.name].cpu().numpy()[s.positions] for gid, s in sites.items()}
