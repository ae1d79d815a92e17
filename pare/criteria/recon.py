"""Reconstruction-aware channel selection (this project's design, beyond the seed papers).

ThiNet (Luo et al. 2017) picks the channels of a layer to remove greedily, by how little the *next* layer's output
changes without them; Channel Pruning (He et al. 2017) then refits the next layer by least squares. This criterion
does both at once for every consumer of the group, with the Optimal Brain Surgeon formula for removing a block of
inputs of a least-squares layer (as in OBS / OBC; here applied to whole input channels):

    E(W') = tr((W' − W) G (W' − W)^T),   G = X X^T + lam·I   (X: the consumer's im2col inputs, calibration data)

Removing the columns S of channel c (forcing W'_S = 0) and refitting the rest optimally raises E by exactly

    ΔE_c = tr(W_S (H_SS)^{-1} W_S^T),   H = G^{-1},

with the refit W ← W − W_S (H_SS)^{-1} H_S,: and H ← H − H_:,S (H_SS)^{-1} H_S,: (H of the remaining inputs).
:meth:`ReconstructionSelection.select` removes, one at a time, the channel with the smallest ΔE summed over the
group's consumers (backward greedy elimination, each step exact given the previous ones), relative to each
consumer's output energy tr(W G W^T) so that consumers of different scale count alike.

:meth:`ReconstructionSelection.score` returns each channel's single-removal ΔE (relative), used by the budget
allocation; the selection itself is the greedy elimination. The refitted weights are not kept: the pruned model
starts from the original weights and :func:`pare.compensate.compensate` refits its consumers on the pruned
model's own inputs. Groups with a consumer that is not a plain conv or linear weight (grouped or depthwise conv,
a norm's input, ...) fall back to the L2 norm of the producer filters for both score and selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError
from pare.graph import Group, Member

from ._common import combine, producer_weights
from .base import Criterion, ScoreContext, register_criterion
from .stats import calibration_batches, eval_mode


def _columns(member: Member, module: nn.Module, channel: int) -> list[int]:
    """Columns of the consumer's flattened input (im2col order: input channel major) that carry ``channel``."""
    k = int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv2d) else 1
    first = member.offset + channel * member.stride
    return list(range(first * k, (first + member.stride) * k))


def _plain_consumers(model: nn.Module, group: Group) -> list[Member] | None:
    """The group's consumer weights (role "in", dim 1) when all are ungrouped Conv2d or Linear; else None."""
    out = []
    for m in group.members:
        if m.role != "in":
            continue
        mod = model.get_submodule(m.module)
        if m.param != "weight" or m.dim != 1:
            return None
        if not (isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)):
            return None
        out.append(m)
    return out or None


def obs_block_costs(w: torch.Tensor, h: torch.Tensor, blocks: Sequence[Sequence[int]]) -> torch.Tensor:
    """ΔE of removing each block of input columns: tr(W_S (H_SS)^{-1} W_S^T).

    ``w``: (out, D) float64; ``h``: (D, D) inverse Gram (of the remaining inputs); ``blocks``: equal-length
    column lists. Returns (len(blocks),) float64.
    """
    idx = torch.as_tensor(np.asarray(blocks, dtype=np.int64))  # (B, s)
    h_ss = h[idx[:, :, None], idx[:, None, :]]  # (B, s, s)
    w_s = w[:, idx].permute(1, 0, 2)  # (B, out, s)
    sol = torch.linalg.solve(h_ss, w_s.transpose(1, 2))  # (B, s, out) = H_SS^{-1} W_S^T
    return (w_s.transpose(1, 2) * sol).sum((1, 2))


def obs_remove(w: torch.Tensor, h: torch.Tensor, cols: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove input columns ``cols`` optimally: the refitted W (out, D) with W_S = 0, and the updated H (D, D)."""
    s = torch.as_tensor(list(cols))
    h_ss_inv = torch.linalg.inv(h[s][:, s])
    w_new = w - w[:, s] @ h_ss_inv @ h[s]
    h_new = h - h[:, s] @ h_ss_inv @ h[s]
    w_new[:, s] = 0.0
    h_new[s] = 0.0
    h_new[:, s] = 0.0
    return w_new, h_new


@register_criterion
class ReconstructionSelection(Criterion):
    """recon (this project's design, beyond the papers): greedy channel elimination by the consumers'
    least-squares reconstruction error (ThiNet's greedy selection with exact OBS refits; see the module doc).

    Options: ``positions`` (spatial positions sampled per image, seeded by ``ctx.seed``; None = all),
    ``ridge`` (relative to the mean diagonal of X X^T).
    """

    name = "recon"
    summary = "reconstruction-aware greedy selection: consumers' least-squares error with OBS refits (beyond papers)"
    evidence = "this project's design (ThiNet greedy selection + Channel Pruning least squares + OBS block formula)"
    needs_data = True

    def __init__(self, positions: int | None = 64, ridge: float = 1e-2) -> None:
        if positions is not None and positions < 1:
            raise ConfigError(f"recon: positions must be >= 1 or None, got {positions}")
        if ridge <= 0:
            raise ConfigError(f"recon: ridge must be > 0 (the Gram matrix is inverted), got {ridge}")
        self.positions = positions
        self.ridge = ridge
        self._grams: dict[str, torch.Tensor] = {}

    def _gram_matrices(self, ctx: ScoreContext, modules: Sequence[str]) -> None:
        """X X^T (D, D) float64 of each consumer module's input over ``ctx.data`` (sampled positions)."""
        todo = [m for m in dict.fromkeys(modules) if m not in self._grams]
        if not todo:
            return
        batches = calibration_batches(ctx, self.name)
        gen = torch.Generator().manual_seed(ctx.seed)
        acc: dict[str, torch.Tensor] = {}

        def hook(mod: nn.Module, inp: tuple[Any, ...], name: str) -> None:
            x = inp[0].detach()
            if isinstance(mod, nn.Linear):
                cols = x.reshape(-1, x.shape[-1]).T
            else:
                u = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, D, L)
                if self.positions is not None and u.shape[2] > self.positions:
                    u = u[:, :, torch.randperm(u.shape[2], generator=gen)[: self.positions]]
                cols = u.permute(1, 0, 2).reshape(u.shape[1], -1)
            cols = cols.double()
            acc[name] = acc.get(name, 0) + cols @ cols.T

        handles = [ctx.model.get_submodule(n).register_forward_pre_hook(
            lambda mod, inp, n=n: hook(mod, inp, n)) for n in todo]
        try:
            with eval_mode(ctx.model), torch.no_grad():
                for images, _labels in batches:
                    ctx.model(images)
        finally:
            for h in handles:
                h.remove()
        self._grams.update(acc)

    def _state(self, ctx: ScoreContext, group: Group, consumers: Sequence[Member]
               ) -> list[tuple[Member, nn.Module, torch.Tensor, torch.Tensor, float]]:
        """Per consumer: (member, module, W (out, D), H = (G + lam I)^{-1}, output energy tr(W G W^T))."""
        out = []
        for m in consumers:
            mod = ctx.model.get_submodule(m.module)
            g = self._grams[m.module]
            w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
            lam = self.ridge * float(torch.diagonal(g).mean())
            h = torch.linalg.inv(g + lam * torch.eye(g.shape[0], dtype=torch.float64))
            energy = float(torch.sum((w @ g) * w)) or 1.0
            out.append((m, mod, w, h, energy))
        return out

    def _fallback(self, ctx: ScoreContext, group: Group) -> np.ndarray:
        return combine(ctx, [w.norm(dim=1).numpy() for _, w in producer_weights(ctx.model, group)])

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        """Per group, each channel's relative single-removal ΔE summed over its consumers, shape (size,)."""
        self._grams = {}
        plain = {g.id: _plain_consumers(ctx.model, g) for g in groups}
        self._gram_matrices(ctx, [m.module for cons in plain.values() if cons for m in cons])
        out: dict[str, np.ndarray] = {}
        for g in groups:
            if plain[g.id] is None:
                out[g.id] = self._fallback(ctx, g)
                continue
            total = np.zeros(g.size)
            for m, mod, w, h, energy in self._state(ctx, g, plain[g.id]):
                blocks = [_columns(m, mod, c) for c in range(g.size)]
                total += obs_block_costs(w, h, blocks).numpy() / energy
            out[g.id] = total
        return out

    def select(self, ctx: ScoreContext, group: Group, scores: np.ndarray, n_remove: int) -> np.ndarray:
        """Indices (ascending) of ``n_remove`` channels, removed one at a time by the smallest summed ΔE."""
        if n_remove <= 0:
            return np.zeros(0, dtype=np.int64)
        consumers = _plain_consumers(ctx.model, group)
        if consumers is None or group.block > 1:
            return super().select(ctx, group, scores, n_remove)
        self._gram_matrices(ctx, [m.module for m in consumers])
        state = [[m, mod, w, h, e] for m, mod, w, h, e in self._state(ctx, group, consumers)]
        alive = list(range(group.size))
        removed: list[int] = []
        for _ in range(n_remove):
            cost = np.zeros(len(alive))
            for m, mod, w, h, energy in state:
                cost += obs_block_costs(w, h, [_columns(m, mod, c) for c in alive]).numpy() / energy
            c = alive.pop(int(np.argmin(cost)))
            removed.append(c)
            for slot in state:
                slot[2], slot[3] = obs_remove(slot[2], slot[3], _columns(slot[0], slot[1], c))
        return np.sort(np.asarray(removed, dtype=np.int64))


def refit_consumers(criterion: ReconstructionSelection, ctx: ScoreContext, group: Group, removed: Sequence[int]
                    ) -> dict[str, torch.Tensor]:
    """Consumer weights refitted by least squares after removing channels ``removed`` of ``group`` (OBS formula
    for the whole set at once: W' = W − W_S (H_SS)^{-1} H_S,:, with W'_S = 0).

    Returns module path -> new weight of the consumer's original shape (its dtype), for plain conv/linear
    consumers; an empty dict when the group has another kind of consumer (no refit possible). Gram matrices
    come from ``ctx.data`` (cached in ``criterion``).
    """
    consumers = _plain_consumers(ctx.model, group)
    if consumers is None or not len(removed):
        return {}
    criterion._gram_matrices(ctx, [m.module for m in consumers])
    out: dict[str, torch.Tensor] = {}
    for m, mod, w, h, _energy in criterion._state(ctx, group, consumers):
        cols = [c for i in removed for c in _columns(m, mod, int(i))]
        w_new, _ = obs_remove(w, h, cols)
        out[m.module] = w_new.reshape(mod.weight.shape).to(mod.weight.dtype)
    return out
