"""Soft filter pruning with FPGM (He et al., CVPR 2019) or norm scores (SFP, He et al., IJCAI 2018);
methods.md §6.1.

:class:`SoftPruneHook` is a trainer hook. At the end of every epoch (``epoch_prune = 1``) it scores the filters
of each target group afresh and sets the ``int(rate · C)`` lowest-scoring filters to zero (conv weight and
bias; the BatchNorm after them is left alone, as in the official code). The zeroed filters keep receiving
gradients, so one that becomes useful again regrows and may survive the next re-scoring: masks are
recomputed every epoch, never accumulated. :meth:`SoftPruneHook.finalize` applies the last masks and removes
the zeroed channels through the engine (:meth:`pare.graph.ChannelGraph.prune`).

Scores (per group, over the producer layer's filters F_i flattened to vectors):

* ``fpgm``: s_i = Σ_j d(F_i, F_j), d Euclidean or 1 − cos (:func:`pare.criteria.fpgm.fpgm_scores`); the
  smallest, nearest the geometric median, are the most replaceable;
* ``l1``: s_i = Σ|F_i|; ``l2``: s_i = ‖F_i‖₂ (SFP).

Target groups: prunable, one producer, no residual coupling, removable channel by channel. A residual sum is
excluded because zeroing one producer's filter does not zero the summed channel (the shortcut still carries
it), so removing that channel afterwards would not be the function that was trained.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pare.criteria._common import producer_weights
from pare.criteria.fpgm import DISTANCES, fpgm_scores
from pare.errors import ConfigError, PruneError
from pare.graph import ChannelGraph, Group
from pare.methods.fold import bn_member, channel_slice, fold_constant_channels, is_residual_group
from pare.train.hooks import Hook

__all__ = ["SCORES", "SoftPruneHook", "soft_scores"]

SCORES = ("fpgm", "l1", "l2")


def soft_scores(filters: torch.Tensor, score: str = "fpgm", distance: str = "euclidean") -> torch.Tensor:
    """Per-filter scores of one layer; the lowest are zeroed. ``filters``: (C, k). Returns (C,) float64."""
    f = filters.to(torch.float64)
    if score == "fpgm":
        return fpgm_scores(f, distance)
    if score == "l1":
        return f.abs().sum(dim=1)
    if score == "l2":
        return f.norm(dim=1)
    raise ConfigError(f"unknown soft-pruning score '{score}'; choose from {', '.join(SCORES)}")


class SoftPruneHook(Hook):
    """Trainer hook for soft filter pruning: re-zero the ``int(rate · C)`` lowest-scoring filters of every
    target group at each epoch end (``on_epoch_end``), letting them regrow in between.

    Args:
        graph: ``pare.trace(model, example_inputs)`` of the model that will be trained (paths must match).
        rate: ``rate_dist`` of the official code, the fraction of each group's C filters zeroed, in [0, 1).
        score: ``"fpgm"`` (default), ``"l1"`` or ``"l2"``.
        distance: FPGM distance, ``"euclidean"`` (default) or ``"cosine"``.
        groups: group ids to soft-prune (default: every single-producer, non-residual prunable group).
        mask_at_start: also zero at the start of the first epoch (the official code masks before training).

    ``masks`` holds the channel indices zeroed at the latest re-masking per group; ``history`` one such dict
    per re-masking, so regrowth (a channel in one mask and not in the next) can be inspected.
    """

    def __init__(self, graph: ChannelGraph, rate: float, *, score: str = "fpgm", distance: str = "euclidean",
                 groups: Iterable[str] | None = None, mask_at_start: bool = True) -> None:
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"soft-pruning rate must be in [0, 1), got {rate}")
        if score not in SCORES:
            raise ConfigError(f"unknown soft-pruning score '{score}'; choose from {', '.join(SCORES)}")
        if distance not in DISTANCES:
            raise ConfigError(f"unknown FPGM distance '{distance}'; choose from {', '.join(DISTANCES)}")
        self.graph, self.rate, self.score, self.distance = graph, float(rate), score, distance
        self.mask_at_start = mask_at_start
        if groups is None:
            self.groups = [g for g in graph.prunable_groups
                           if g.block == 1 and len(g.producers()) == 1 and not is_residual_group(g)]
        else:
            self.groups = []
            for gid in groups:
                g = graph.group(gid)
                if not g.prunable or g.block != 1 or len(g.producers()) != 1 or is_residual_group(g):
                    raise ConfigError(f"group '{gid}' cannot be soft-pruned: it must be prunable, have one "
                                      "producer, no residual coupling and block 1")
                self.groups.append(g)
        if not self.groups:
            raise ConfigError("no group can be soft-pruned in this model")
        self.masks: dict[str, list[int]] = {}
        self.history: list[dict[str, list[int]]] = []
        self.label = f"soft {score} pruning (He et al. 2018/2019), rate {rate}"

    def count(self, group: Group) -> int:
        """How many of ``group``'s channels are zeroed: ``int(rate · C)``, at most C − 1."""
        return min(int(group.size * self.rate), group.size - 1)

    def select(self, model: nn.Module) -> dict[str, list[int]]:
        """Per target group, the sorted indices of the ``count`` lowest-scoring filters of ``model`` now
        (ties broken by the lower index)."""
        out: dict[str, list[int]] = {}
        for g in self.groups:
            k = self.count(g)
            if k == 0:
                continue
            ((_, filters),) = producer_weights(model, g)  # (C, fan_in·kh·kw); one producer by construction
            s = soft_scores(filters, self.score, self.distance).numpy()
            out[g.id] = sorted(int(i) for i in np.argsort(s, kind="stable")[:k])
        return out

    @torch.no_grad()
    def apply(self, model: nn.Module) -> dict[str, list[int]]:
        """Re-score, zero the selected filters (producer weight and bias) in place, record and return them."""
        masks = self.select(model)
        for g in self.groups:
            for i in masks.get(g.id, ()):
                for m in g.producers():
                    tensor = getattr(model.get_submodule(m.module), m.param, None)
                    if isinstance(tensor, torch.Tensor):
                        tensor.narrow(m.dim, channel_slice(m, i).start, m.stride).zero_()
        self.masks = masks
        self.history.append({k: list(v) for k, v in masks.items()})
        return masks

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if epoch == 0 and self.mask_at_start and not self.history:
            self.apply(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.apply(model)

    def state_dict(self) -> dict[str, object]:
        return {"history": [{k: list(v) for k, v in h.items()} for h in self.history]}

    def load_state_dict(self, state: dict[str, object]) -> None:
        history = state.get("history", [])
        if not isinstance(history, list):
            raise ConfigError("soft-pruning state: 'history' must be a list")
        self.history = [{str(k): [int(i) for i in v] for k, v in h.items()} for h in history]
        self.masks = dict(self.history[-1]) if self.history else {}

    def finalize(self, model: nn.Module, example_inputs: torch.Tensor, *, fold: bool = True
                 ) -> tuple[nn.Module, dict[str, list[int]]]:
        """Hard-prune: apply the masks once more, then remove the zeroed channels through the engine.

        A zeroed filter still outputs a constant after its BatchNorm (``γ·(b − μ)/√(σ² + ε) + β`` in eval mode,
        b the conv bias, 0 here). With ``fold`` that constant is moved into the consumers' biases / following
        BN running means (:func:`pare.methods.fold.fold_constant_channels`), so the pruned model computes what
        the masked one did in eval mode, up to the zero-padding border effect described in
        :mod:`pare.methods.fold`. ``model`` is modified (masked, folded); the returned model is new.

        Returns (pruned model, removals: group id -> sorted channel indices).
        """
        removals = self.apply(model)
        graph = self._retrace(model, example_inputs)
        if fold:
            for g in self.groups:
                channels = removals.get(g.id)
                if not channels:
                    continue
                bn = bn_member(graph, g)
                if bn is None:
                    continue  # no norm: a zeroed filter with its bias zeroed outputs exactly zero
                norm = graph.model.get_submodule(bn.module)
                assert isinstance(norm, _BatchNorm)
                if norm.running_mean is None or norm.running_var is None:
                    raise PruneError(f"group '{g.id}': folding needs BatchNorm running statistics")
                idx = [channel_slice(bn, i).start for i in channels]
                with torch.no_grad():
                    scale = norm.weight[idx] / torch.sqrt(norm.running_var[idx] + norm.eps)
                    # The conv output of a zeroed filter is 0, so the BN outputs β − γ·μ/√(σ²+ε): write that as
                    # β with γ = 0, the form fold_constant_channels expects.
                    norm.bias[idx] = norm.bias[idx] - scale * norm.running_mean[idx]
                    norm.weight[idx] = 0.0
                fold_constant_channels(graph, g, np.asarray(channels, dtype=np.int64))
        return graph.prune(removals), removals

    def _retrace(self, model: nn.Module, example_inputs: torch.Tensor) -> ChannelGraph:
        from pare.graph import trace

        graph = trace(model, example_inputs)
        known = {g.id for g in graph.prunable_groups}
        missing = [g.id for g in self.groups if g.id not in known]
        if missing:
            raise PruneError(f"groups {missing} are not in the retraced model; was it changed since tracing?")
        # Groups of the new trace (same ids), so member paths refer to ``model`` itself.
        self.groups = [graph.group(g.id) for g in self.groups]
        return graph
