"""HRank (Lin et al., CVPR 2020): the average matrix rank of each channel's feature map, methods.md §6.1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pare.graph import Group

from .base import Criterion, ScoreContext, register_criterion
from .stats import feature_sites, stream_maps


def map_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Matrix rank of every (h, w) map. ``maps``: (N, C, h, w) -> (N, C) int64.

    Computed in the maps' own dtype with torch's default tolerance (σ_max·max(h, w)·eps), like the official code's
    ``torch.matrix_rank`` on float32 maps; float64 maps would count some near-degenerate maps one higher.
    """
    if maps.dim() < 2 or maps.dim() > 4:
        raise ValueError(f"HRank needs (N, C[, h[, w]]) maps, got shape {tuple(maps.shape)}")
    # A fully connected output (N, C) or a 1-D map (N, C, L) is a 1×1 or 1×L matrix per channel.
    while maps.dim() < 4:
        maps = maps.unsqueeze(2)
    return torch.linalg.matrix_rank(maps)


@register_criterion
class HRank(Criterion):
    """Score of channel i: the mean over calibration images of rank(feature map of channel i).

    The map is the group's feature node (post-ReLU after conv/BN, post-addition for the last conv of a residual
    block). One fixed calibration set is streamed once for all groups; the highest-rank channels are kept.
    """

    name = "hrank"
    summary = "mean matrix rank of each channel's post-ReLU feature map (Lin et al. 2020)"
    evidence = "paper + official code (lmbxmu/HRank)"
    needs_data = True

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        sites = feature_sites(ctx.graph, groups)
        sums: dict[str, torch.Tensor] = {}

        def update(node: str, out: torch.Tensor) -> None:
            # One rank computation per node, shared by every group observed there.
            sums[node] = sums.get(node, 0) + map_ranks(out).sum(0).to(torch.float64)

        n = stream_maps(ctx, [s.node for s in sites.values()], update, self.name)
        return {gid: (sums[s.node.name].cpu().numpy() / n)[s.positions] for gid, s in sites.items()}
