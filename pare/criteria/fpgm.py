"""FPGM, filter pruning via the geometric median (He et al., CVPR 2019), methods.md §6.1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pare.errors import ConfigError
from pare.graph import Group

from ._common import combine, producer_weights, whole_producer_weight
from .base import Criterion, ScoreContext, register_criterion

DISTANCES = ("euclidean", "cosine")


def fpgm_scores(filters: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """s_i = Σ_j d(F_i, F_j) over all filters of one layer.

    ``filters``: (C, k) flattened filters. Returns (C,) float64. ``euclidean``: d = ‖F_i − F_j‖₂;
    ``cosine``: d = 1 − cos(F_i, F_j) (a zero filter has cosine 0 to everything, so distance 1). The official
    code's distance switch is always true, so its cosine option never ran; here it is honoured.
    """
    f = filters.to(torch.float64)
    if distance == "euclidean":
        # cdist's default matmul path loses precision for near-identical filters; the direct path is exact.
        d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
    elif distance == "cosine":
        unit = f / f.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        d = 1.0 - unit @ unit.T
        d.fill_diagonal_(0.0)
    else:
        raise ConfigError(f"unknown FPGM distance '{distance}'; choose from {', '.join(DISTANCES)}")
    return d.sum(1)


@register_criterion
class FPGM(Criterion):
    """Score of filter i: Σ_j ‖F_i − F_j‖₂ within its producer layer; the smallest (nearest the geometric median,
    hence most replaceable) are pruned.

    The sum runs over all filters of the layer, as in the official code, also when the group holds only some of
    the layer's channels. Several producers combine with ``ctx.aggregate``. This is the hard-pruning criterion;
    FPGM's soft-pruning schedule (re-masking each epoch) belongs to the training loop.
    """

    name = "fpgm"
    summary = "distance to the other filters of the layer (geometric median, He et al. 2019); euclidean or cosine"
    evidence = "paper + official code (he-y/filter-pruning-geometric-median)"

    def __init__(self, distance: str = "euclidean") -> None:
        if distance not in DISTANCES:
            raise ConfigError(f"unknown FPGM distance '{distance}'; choose from {', '.join(DISTANCES)}")
        self.distance = distance

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        for g in groups:
            per_member = []
            for member, _ in producer_weights(ctx.model, g):
                layer, rows = whole_producer_weight(ctx.model, member, g.size)
                per_member.append(fpgm_scores(layer, self.distance).numpy()[rows])
            result[g.id] = combine(ctx, per_member)
        return result
