"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf, ICLR 2017), methods.md §6.1."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pare.errors import ConfigError
from pare.graph import ChannelGraph, Group

from ._common import combine, producer_weights
from .base import Criterion, ScoreContext, register_criterion


def greedy_pruned_inputs(graph: ChannelGraph, removals: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Input channels of each consumer that earlier removals already took away, for the greedy L1 variant.

    Returns module path -> sorted indices along dim 1 of that module's weight (conv input channels, or Linear
    input features for a flattened map: all ``stride`` features of a removed channel).
    """
    out: dict[str, set[int]] = {}
    for gid, idx in removals.items():
        group = graph.group(gid)
        for m in group.members:
            if m.role != "in" or m.dim != 1:
                continue
            cols = out.setdefault(m.module, set())
            for i in idx:
                start = m.offset + int(i) * m.stride
                cols.update(range(start, start + m.stride))
    return {k: sorted(v) for k, v in out.items()}


@register_criterion
class L1Norm(Criterion):
    """Score of filter j: Σ|W_j| over (c_in, kh, kw); the smallest are pruned.

    ``pruned_inputs`` (module path -> input channel indices, see :func:`greedy_pruned_inputs`) gives Li et
    al.'s *greedy* variant: kernels that read input maps already pruned do not count. Without it the score is
    the *independent* variant. Groups with several producers (residual sums) combine the producers' scores with
    ``ctx.aggregate``.
    """

    name = "l1"
    summary = "L1 norm of each filter (Li et al. 2017); optional greedy variant ignoring pruned inputs"
    evidence = "paper + reimplementation (Eric-mingjie/rethinking-network-pruning)"

    def __init__(self, pruned_inputs: Mapping[str, Sequence[int]] | None = None) -> None:
        self.pruned_inputs = {k: list(v) for k, v in (pruned_inputs or {}).items()}

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = {}
        for g in groups:
            per_member = []
            for member, w in producer_weights(ctx.model, g):
                full = getattr(ctx.model.get_submodule(member.module), member.param)
                drop = self.pruned_inputs.get(member.module)
                if drop:
                    if member.dim != 0 or full.dim() < 2:
                        raise ConfigError(f"greedy L1: '{member.module}' is not a filter bank with input dim 1")
                    groups_attr = getattr(ctx.model.get_submodule(member.module), "groups", 1)
                    if groups_attr != 1:
                        raise ConfigError(f"greedy L1: '{member.module}' is a grouped conv; pruned inputs ambiguous")
                    keep = torch.ones(full.shape[1], dtype=torch.bool)
                    keep[torch.as_tensor(drop, dtype=torch.long)] = False
                    # (size, c_in, k...) with the pruned input maps removed
                    w = w.reshape(g.size, full.shape[1], -1)[:, keep].reshape(g.size, -1)
                per_member.append(w.abs().sum(1).numpy())
            result[g.id] = combine(ctx, per_member)
        return result
