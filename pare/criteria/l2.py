"""L2-norm filter criterion (the ℓ2 counterpart of Li et al.'s L1 score), methods.md §6.1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pare.graph import Group

from ._common import combine, producer_weights
from .base import Criterion, ScoreContext, register_criterion


@register_criterion
class L2Norm(Criterion):
    """Score of filter j: ‖W_j‖₂ over (c_in, kh, kw); producers of coupled groups combine with ``ctx.aggregate``."""

    name = "l2"
    summary = "L2 norm of each filter"
    evidence = "standard baseline (ℓ2 variant of Li et al. 2017)"

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        return {
            g.id: combine(ctx, [w.pow(2).sum(1).sqrt().numpy() for _, w in producer_weights(ctx.model, g)])
            for g in groups
        }
