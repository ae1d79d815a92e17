"""Least-squares reconstruction of the layers that lost input channels (beyond the seed papers).

ThiNet / Channel Pruning (He et al. 2017) style: after removal, each consumer conv or linear whose input lost
channels gets new weights ``W'`` that best reproduce the *original* layer's output from the inputs the pruned
model actually feeds it, on calibration data:

    W' = argmin_W ||Y - W X_kept||^2 + lam ||W||^2,   Y = W_orig X_orig (bias excluded, kept output rows)

with ``X`` the im2col patches. The normal equations are accumulated over batches in float64, so memory stays
bounded; ``positions`` samples a few spatial positions per image (seeded) as ThiNet does, which keeps the
cost low with a negligible loss in fit. Layers are solved independently from one pass over the data (the
inputs come from the pruned model before any layer is changed). Grouped convolutions are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError, DataError
from pare.graph import ChannelGraph


def _kept(size: int, removed: set[int]) -> list[int]:
    return [i for i in range(size) if i not in removed]


def removed_slices(graph: ChannelGraph, removals: Mapping[str, Sequence[int]]) -> dict[tuple[str, int], set[int]]:
    """Per ``(module, dim)`` of a weight, the removed positions along that dim (from the group members)."""
    out: dict[tuple[str, int], set[int]] = {}
    for gid, idx in removals.items():
        if not len(idx):
            continue
        group = graph.group(gid)
        for m in group.members:
            if m.param != "weight" or m.role not in ("in", "out"):
                continue
            rows = out.setdefault((m.module, m.dim), set())
            for i in idx:
                rows.update(range(m.offset + int(i) * m.stride, m.offset + (int(i) + 1) * m.stride))
    return out


def _patches(module: nn.Module, x: torch.Tensor, positions: int | None, gen: torch.Generator) -> torch.Tensor:
    """(D, P) float64 columns: im2col patches of a conv input (or the features of a linear input)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T.double()
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, D, L)
    if positions is not None and cols.shape[2] > positions:
        pick = torch.randperm(cols.shape[2], generator=gen)[:positions]
        cols = cols[:, :, pick]
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1).double()


def consumers(graph: ChannelGraph, pruned: nn.Module, removals: Mapping[str, Sequence[int]]) -> list[str]:
    """Conv (ungrouped) and linear modules whose input channels ``removals`` reduces."""
    sl = removed_slices(graph, removals)
    names = []
    for (module, dim), rows in sl.items():
        if dim != 1 or not rows:
            continue
        mod = pruned.get_submodule(module)
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            names.append(module)
    order = {name: i for i, (name, _) in enumerate(pruned.named_modules())}
    return sorted(set(names), key=lambda n: order.get(n, 0))


def _inputs(model: nn.Module, names: Sequence[str], images: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, inp: tuple[Any, ...], name: str = name) -> None:
            got[name] = inp[0].detach()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return got


def _residual(ref: float, b: torch.Tensor, g: torch.Tensor, w: torch.Tensor) -> float:
    """||Y - W X||^2 = tr(W_o O W_o^T) - 2 tr(W B^T) + tr(W G W^T), from the accumulated products."""
    return ref - 2 * float(torch.sum(w * b)) + float(torch.trace(w @ g @ w.T))


@torch.no_grad()
def compensate(
    original: nn.Module,
    pruned: nn.Module,
    graph: ChannelGraph,
    removals: Mapping[str, Sequence[int]],
    data: Sequence[tuple[torch.Tensor, torch.Tensor]] | Sequence[torch.Tensor],
    *,
    ridge: float = 1e-3,
    positions: int | None = 128,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Rewrite, in place, the weights of every consumer of removed channels in ``pruned`` (see module doc).

    Args:
        original: the unpruned model (only read); ``graph`` must be its trace and ``removals`` what made
            ``pruned``.
        data: calibration batches (images, or (images, labels)); run in eval mode.
        ridge: regulariser relative to the mean diagonal of X X^T (scale-free).
        positions: spatial positions sampled per image for convs (None: all).

    Returns:
        per layer: ``{"before": relative squared error of plain removal, "after": with the new weights}``,
        both on the calibration data used to fit them.
    """
    if ridge < 0:
        raise ConfigError(f"compensate: ridge must be >= 0, got {ridge}")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    if not batches:
        raise DataError("compensate: needs calibration data, got no batches")
    names = consumers(graph, pruned, removals)
    if not names:
        return {}
    sl = removed_slices(graph, removals)
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, dict[str, torch.Tensor]] = {}
    flags = [(m, m.training) for m in [*original.modules(), *pruned.modules()]]
    original.eval()
    pruned.eval()
    try:
        for images in batches:
            x_orig = _inputs(original, names, images)
            x_pruned = _inputs(pruned, names, images)
            for name in names:
                mod = pruned.get_submodule(name)
                # The same positions for both models: one seed drawn per layer and batch.
                seed_b = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                a_o = _patches(mod, x_orig[name], positions, torch.Generator().manual_seed(seed_b))
                a_p = _patches(mod, x_pruned[name], positions, torch.Generator().manual_seed(seed_b))
                slot = acc.setdefault(name, {"G": torch.zeros(a_p.shape[0], a_p.shape[0], dtype=torch.float64),
                                             "C": torch.zeros(a_o.shape[0], a_p.shape[0], dtype=torch.float64),
                                             "O": torch.zeros(a_o.shape[0], a_o.shape[0], dtype=torch.float64)})
                slot["G"] += a_p @ a_p.T
                slot["C"] += a_o @ a_p.T
                slot["O"] += a_o @ a_o.T
    finally:
        for m, f in flags:
            m.training = f
    report: dict[str, dict[str, float]] = {}
    for name in names:
        orig_mod, mod = original.get_submodule(name), pruned.get_submodule(name)
        w_o = orig_mod.weight.detach().double()
        keep_out = _kept(w_o.shape[0], sl.get((name, 0), set()))
        keep_in = _kept(w_o.shape[1], sl.get((name, 1), set()))
        w_o = w_o[keep_out]
        out_rows = w_o.shape[0]
        w_o_mat = w_o.reshape(out_rows, -1)
        plain = w_o[:, keep_in]  # plain removal: the original weights of the kept input channels
        plain_mat = plain.reshape(out_rows, -1)
        g, c, o = acc[name]["G"], acc[name]["C"], acc[name]["O"]
        if plain_mat.shape[1] != g.shape[0] or tuple(mod.weight.shape) != tuple(plain.shape):
            raise ConfigError(
                f"compensate: layer '{name}' does not match the removals (shape {tuple(mod.weight.shape)})"
            )
        lam = ridge * float(torch.diagonal(g).mean()) if g.numel() else 0.0
        b = w_o_mat @ c  # Y X^T
        new = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=torch.float64), b.T).T
        ref = float(torch.trace(w_o_mat @ o @ w_o_mat.T))
        scale = ref or 1.0
        before = _residual(ref, b, g, plain_mat) / scale
        after = _residual(ref, b, g, new) / scale
        if not np.isfinite(after) or after > before:
            report[name] = {"before": before, "after": before, "applied": 0.0}
            continue
        mod.weight.copy_(new.reshape(plain.shape).to(mod.weight.dtype))
        report[name] = {"before": before, "after": after, "applied": 1.0}
    return report
