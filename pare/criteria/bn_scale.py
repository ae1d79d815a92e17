"""Network slimming's criterion: |γ| of the BN (or GroupNorm) scale of each channel, methods.md §6.1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pare.errors import ConfigError
from pare.graph import Group

from ._common import combine, norm_modules, norm_param
from .base import Criterion, ScoreContext, register_criterion


@register_criterion
class BNScale(Criterion):
    """Score of channel i: |γ_i| of the norm that follows its producer (Liu et al. 2017).

    Groups with several norms (residual sums) combine them with ``ctx.aggregate``. A group without an affine norm
    cannot be scored and raises :class:`pare.ConfigError`. Slimming's sparsity training (the s·sign(γ)
    subgradient) and its global quantile threshold live with the trainer and the allocation helper.
    """

    name = "bn_scale"
    summary = "|gamma| of the channel's BatchNorm/GroupNorm scale (network slimming, Liu et al. 2017)"
    evidence = "paper + official code (Eric-mingjie/network-slimming)"

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        for g in groups:
            norms = norm_modules(g)
            if not norms:
                raise ConfigError(f"criterion 'bn_scale': group '{g.id}' has no affine norm layer")
            result[g.id] = combine(ctx, [np.abs(norm_param(ctx.model, g, n, "weight")) for n in norms])
        return result
