"""DACP-style pruning (reconstructed from the abstract) of Yao, Li, Kang, Wang, arXiv:2210.16504 (2022);
methods.md §5.2.

This is NOT the paper's method: the paper's formulas, its "connectivity-power", hyperparameters and thresholds are
unknown. Everything here is this project's design, reconstructed from the abstract ("group-lasso penalty",
"angle dissimilarity constraint on the channels and filters", "different level of penalty according to different
connectivity-power"). For a conv layer with filters Fₖ = W[k] (output groups) and input slices Cₘ = W[:, m]:

    penalty = λ_GL·Σₗ [Σₖ aₖ‖Fₖ‖ + Σₘ bₘ‖Cₘ‖] + λ_ang·Σₗ [Σ_{k<k'} cos²(Fₖ, Fₖ') + Σ_{m<m'} cos²(Cₘ, Cₘ')]

with ‖v‖ = sqrt(Σv² + ε) and cos(u, v) = ⟨u, v⟩ / (‖u‖·‖v‖) (ε keeps both finite for an all-zero group), and
the connectivity weights aₖ = 1 + Σ_{k'≠k} |cos(Fₖ, Fₖ')| / (K − 1), bₘ likewise over input slices, computed
without gradient once per epoch (:class:`DacpHook`). Groups whose norm falls below ``eps_rel`` times the largest
in their layer are removed (:func:`dacp_removals`), or a global budget of the lowest relative norms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pare.errors import ConfigError
from pare.graph import ChannelGraph
from pare.methods.fold import channel_slice
from pare.train.hooks import Hook

__all__ = ["EVIDENCE", "LABEL", "SUMMARY", "DacpHook", "DacpSelection", "connectivity_weights", "dacp_penalty",
           "dacp_removals", "group_norms"]

LABEL = "DACP-style (reconstructed from the abstract)"
SUMMARY = (
    "DACP-style (reconstructed from the abstract): group lasso on filters and input channels weighted by "
    "connectivity-power, plus a cos² angle-dissimilarity penalty; prune groups with small norm"
)
EVIDENCE = (
    "reconstructed from the abstract of arXiv:2210.16504; formulas, connectivity-power, hyperparameters and "
    "thresholds are this project's design (methods.md §5.2), not the paper's"
)


def _eps_norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Row norms sqrt(Σ v² + ε) of a (G, D) matrix -> (G,); finite with a finite gradient at v = 0."""
    return torch.sqrt((v * v).sum(dim=1) + eps)


def _cosines(v: torch.Tensor, eps: float) -> torch.Tensor:
    """Pairwise cosine matrix (G, G) of the rows of ``v`` (G, D), with ε-norms."""
    n = _eps_norm(v, eps)
    return (v @ v.t()) / (n[:, None] * n[None, :])


def _groups_of(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filters (K, C·kh·kw) and input slices (C, K·kh·kw) of a conv weight (K, C, kh, kw)."""
    k, c = weight.shape[0], weight.shape[1]
    return weight.reshape(k, -1), weight.transpose(0, 1).reshape(c, -1)


def connectivity_weights(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (K,), b (C,)) for a conv weight (K, C, kh, kw), detached: aₖ = 1 + mean_{k'≠k} |cos(Fₖ, Fₖ')|."""
    with torch.no_grad():
        out = []
        for v in _groups_of(weight.detach()):
            g = v.shape[0]
            if g < 2:
                out.append(torch.ones(g, dtype=v.dtype, device=v.device))
                continue
            cos = _cosines(v, eps).abs()
            off = cos.sum(dim=1) - cos.diagonal()
            out.append(1.0 + off / (g - 1))
        return out[0], out[1]


def dacp_penalty(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lambda_gl: float, lambda_ang: float,
                 eps: float) -> torch.Tensor:
    """The §5.2 penalty of one conv layer (a scalar tensor, differentiable in ``weight`` (K, C, kh, kw))."""
    filters, channels = _groups_of(weight)
    gl = (a * _eps_norm(filters, eps)).sum() + (b * _eps_norm(channels, eps)).sum()
    ang = weight.new_zeros(())
    for v in (filters, channels):
        if v.shape[0] > 1:
            cos = _cosines(v, eps)
            ang = ang + torch.triu(cos * cos, diagonal=1).sum()  # pairs k < k' only
    return lambda_gl * gl + lambda_ang * ang


def _default_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


class DacpHook(Hook):
    """Trainer hook adding the DACP-style penalty (reconstructed from the abstract) in ``on_loss``.

    ``layers``: conv paths to penalise (default: every non-grouped Conv2d). aₖ, bₘ are recomputed without
    gradient in ``on_epoch_start`` (and lazily before the first loss); they are saved in the hook state so that a
    resumed run uses the same weights for the rest of the epoch.
    """

    def __init__(self, lambda_gl: float, lambda_ang: float, eps: float = 1e-8,
                 layers: Iterable[str] | None = None) -> None:
        if lambda_gl < 0 or lambda_ang < 0 or eps <= 0:
            raise ConfigError("need lambda_gl >= 0, lambda_ang >= 0 and eps > 0")
        self.lambda_gl = float(lambda_gl)
        self.lambda_ang = float(lambda_ang)
        self.eps = float(eps)
        self.layers = None if layers is None else list(layers)
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.epoch: int | None = None
        self.label = LABEL

    def refresh(self, model: nn.Module) -> None:
        """Recompute aₖ, bₘ for every penalised layer from the current weights (no gradient)."""
        layers = self.layers if self.layers is not None else _default_layers(model)
        self.weights = {p: connectivity_weights(model.get_submodule(p).weight, self.eps) for p in layers}

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if self.epoch == epoch and self.weights:
            return  # resumed inside this epoch: keep the weights the interrupted run used
        self.refresh(model)
        self.epoch = epoch

    def penalty(self, model: nn.Module) -> torch.Tensor:
        if not self.weights:
            self.refresh(model)
        total: torch.Tensor | None = None
        for path, (a, b) in self.weights.items():
            w = model.get_submodule(path).weight
            p = dacp_penalty(w, a.to(w.device), b.to(w.device), self.lambda_gl, self.lambda_ang, self.eps)
            total = p if total is None else total + p
        return total if total is not None else torch.zeros(())

    def on_loss(self, model: nn.Module, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        return loss + self.penalty(model).to(loss.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "weights": {p: [a.detach().cpu(), b.detach().cpu()] for p, (a, b) in self.weights.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.weights = {p: (ab[0], ab[1]) for p, ab in state["weights"].items()}


@dataclass
class DacpSelection:
    """Result of :func:`dacp_removals`: ``removals`` (group id -> indices), ``norms`` (group id -> (size,)
    channel norms), and ``label`` = "DACP-style (reconstructed from the abstract)"."""

    removals: dict[str, list[int]]
    norms: dict[str, np.ndarray]
    label: str = LABEL


def group_norms(graph: ChannelGraph, model: nn.Module) -> dict[str, np.ndarray]:
    """Per prunable group, the L2 norm of each channel's filters, shape (size,) float64: the root sum of squares
    over all producers' output slices (several producers in a residual-sum group)."""
    out: dict[str, np.ndarray] = {}
    for g in graph.prunable_groups:
        sq = np.zeros(g.size)
        found = False
        for m in g.members:
            if m.role != "out" or m.param != "weight":
                continue
            w = model.get_submodule(m.module).weight.detach().double().cpu()
            for i in range(g.size):
                sq[i] += float((w.narrow(m.dim, channel_slice(m, i).start, m.stride) ** 2).sum())
            found = True
        if found:
            out[g.id] = np.sqrt(sq)
    return out


def dacp_removals(graph: ChannelGraph, model: nn.Module, eps_rel: float = 1e-3,
                  budget: float | None = None) -> DacpSelection:
    """Select groups to remove by filter norm (DACP-style, reconstructed from the abstract).

    Default: remove channels with norm < ``eps_rel`` · (largest norm in the group). With ``budget`` (a fraction
    in [0, 1)), instead remove the ``int(budget · total)`` channels with the smallest relative norm
    (norm / group max) over all prunable groups ([design]: relative, so layers of different scale compare).
    A group always keeps at least one channel.
    """
    norms = {gid: n for gid, n in group_norms(graph, model).items() if graph.group(gid).block == 1}
    removals: dict[str, list[int]] = {}
    if budget is None:
        if eps_rel < 0:
            raise ConfigError(f"eps_rel must be >= 0, got {eps_rel}")
        for gid, n in norms.items():
            idx = np.flatnonzero(n < eps_rel * n.max())
            if idx.size:
                removals[gid] = sorted(int(i) for i in idx)
        return DacpSelection(removals, norms)
    if not 0.0 <= budget < 1.0:
        raise ConfigError(f"budget must be in [0, 1), got {budget}")
    entries = []
    for gid, n in norms.items():
        rel = n / n.max() if n.max() > 0 else np.zeros_like(n)
        entries += [(float(rel[i]), gid, i) for i in range(n.size)]
    entries.sort()
    target = int(budget * len(entries))
    chosen: dict[str, list[int]] = {}
    for _, gid, i in entries:
        if sum(len(v) for v in chosen.values()) >= target:
            break
        if len(chosen.get(gid, [])) < norms[gid].size - 1:
            chosen.setdefault(gid, []).append(i)
    return DacpSelection({gid: sorted(v) for gid, v in chosen.items()}, norms)
