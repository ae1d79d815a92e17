"""Random scores: the sanity baseline every criterion must beat."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from pare.graph import Group

from .base import Criterion, ScoreContext, register_criterion


@register_criterion
class RandomCriterion(Criterion):
    """Uniform random scores in [0, 1), seeded by ``ctx.seed`` and the group id (CRC32), so the same seed gives the
    same scores for a group whatever other groups are scored alongside it."""

    name = "random"
    summary = "uniform random scores, seeded (sanity baseline)"
    evidence = "baseline"

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        return {
            g.id: np.random.default_rng([ctx.seed, zlib.crc32(g.id.encode())]).random(g.size) for g in groups
        }
