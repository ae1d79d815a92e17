"""Least-squares reconstruction of the layers that lost input channels (beyond the seed papers).

ThiNet / Channel Pruning (He et al. 2017) style: after removal, each consumer conv or linear whose input lost
channels gets new weights ``W'`` that best reproduce the *original* layer's output from the inputs the pruned
model actually feeds it, on calibration data:

    W' = argmin_W ||Y - W X_kept||^2 + lam ||W||^2,   Y = W_orig X_orig (bias excluded, kept output rows)

with ``X`` the im2col patches. The normal equations are accumulated over batches in float64, so memory stays
bounded; ``positions`` samples a few spatial positions per image (seeded) as ThiNet does, which keeps the
cost low with a negligible loss in fit. Grouped convolutions are skipped.

Two solve orders:

* ``"sequential"`` (default; Channel Pruning's layer-by-layer reconstruction): the consumers are solved one at a
  time in execution order, and each one's inputs ``X_kept`` are recomputed from the pruned model *after* every
  earlier consumer got its new weights, so a layer also corrects the error its predecessors left. The targets
  ``Y`` come from one pass of the original model over the same images and positions. Once a layer is solved,
  the BatchNorm that directly follows it gets the original running statistics back (its input now approximates
  the original's), so the later layers are fitted on consistent inputs. With ``residual=True`` (default), a layer
  whose norm feeds a residual addition ``norm(layer(x)) + shortcut(...)`` (``shortcut`` a module) is fitted to
  reproduce the original *sum*: the target becomes ``Y + (σ/γ)·(shortcut_orig − shortcut_pruned)``, so each block
  also cancels the error the shortcut carries from the blocks before it (this project's extension).
* ``"independent"``: every layer from one pass of the pruned model before any layer is changed (cheaper, but a
  layer's fit is stale once the layers before it change).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from pare.errors import ConfigError, DataError, PruneError
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


METHODS = ("sequential", "independent")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything wanted is captured."""


def _execution_order(model: nn.Module, names: Sequence[str], images: torch.Tensor) -> list[str]:
    """``names`` sorted by when each module is first called in a forward pass (one image)."""
    first: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod: nn.Module, inp: tuple[Any, ...], name: str = name) -> None:
            first.setdefault(name, len(first))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(images[:1])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in first]
    if missing:
        raise PruneError(f"compensate: layer '{missing[0]}' was not called in the forward pass")
    return sorted(names, key=first.__getitem__)


def _out_length(module: nn.Module, x: torch.Tensor) -> int:
    """Number of output positions of a conv on input ``x`` (N, C, H, W): the unfolded length."""
    h, w = x.shape[-2:]
    k, d, pad, st = (nn.modules.utils._pair(v) for v in (module.kernel_size, module.dilation, module.padding,
                                                           module.stride))
    length = 1
    for size, kk, dd, pp, ss in ((h, k[0], d[0], pad[0], st[0]), (w, k[1], d[1], pad[1], st[1])):
        length *= (size + 2 * pp - dd * (kk - 1) - 1) // ss + 1
    return length


def _pick(module: nn.Module, x: torch.Tensor, positions: int | None, seed: int) -> torch.Tensor | None:
    """Seeded spatial positions (indices into the unfolded length) for a conv input; None = all / linear."""
    if isinstance(module, nn.Linear) or positions is None:
        return None
    length = _out_length(module, x)
    if length <= positions:
        return None
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed))[:positions]


def _cols(module: nn.Module, x: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """(D, P) float64 columns of a conv input's patches at ``pick`` (all when None) or of a linear input."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T.double()
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, D, L)
    if pick is not None:
        cols = cols[:, :, pick]
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1).double()


def _layer_weights(original: nn.Module, pruned: nn.Module, name: str, sl: Mapping[tuple[str, int], set[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(original weight of the kept output rows as (out, D_orig), plain removal as (out, D_kept), kept shape)."""
    w_o = original.get_submodule(name).weight.detach().double()
    keep_out = _kept(w_o.shape[0], sl.get((name, 0), set()))
    keep_in = _kept(w_o.shape[1], sl.get((name, 1), set()))
    w_o = w_o[keep_out]
    plain = w_o[:, keep_in]
    mod = pruned.get_submodule(name)
    if tuple(mod.weight.shape) != tuple(plain.shape):
        raise ConfigError(f"compensate: layer '{name}' does not match the removals (shape {tuple(mod.weight.shape)})")
    return w_o.reshape(w_o.shape[0], -1), plain.reshape(plain.shape[0], -1), tuple(plain.shape)


def _solve(mod: nn.Module, ref: float, b: torch.Tensor, g: torch.Tensor, plain: torch.Tensor,
           shape: tuple[int, ...], ridge: float) -> dict[str, float]:
    """Solve (G + lam I) W^T = B^T, write W into ``mod`` unless it fits worse than plain removal; the report."""
    lam = ridge * float(torch.diagonal(g).mean()) if g.numel() else 0.0
    new = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=torch.float64), b.T).T
    scale = ref or 1.0
    before = _residual(ref, b, g, plain) / scale
    after = _residual(ref, b, g, new) / scale
    if not np.isfinite(after) or after > before:
        return {"before": before, "after": before, "applied": 0.0}
    mod.weight.copy_(new.reshape(shape).to(mod.weight.dtype))
    return {"before": before, "after": after, "applied": 1.0}


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
    method: str = "sequential",
    residual: bool = True,
) -> dict[str, dict[str, float]]:
    """Rewrite, in place, the weights of every consumer of removed channels in ``pruned`` (see module doc).

    Args:
        original: the unpruned model (only read); ``graph`` must be its trace and ``removals`` what made
            ``pruned``.
        data: calibration batches (images (N, C, H, W), or (images, labels)); run in eval mode.
        ridge: regulariser relative to the mean diagonal of X X^T (scale-free).
        positions: spatial positions sampled per image for convs (None: all). The same positions are used for
            the original and the pruned model.
        method: ``"sequential"`` (layer by layer, inputs recomputed after each solved layer) or
            ``"independent"`` (all layers from one pass).
        residual: sequential only: fit layers followed by norm + residual addition to the original sum (see
            the module doc); False fits every layer to its own original output.

    Returns:
        per layer: ``{"before": relative squared error of plain removal, "after": with the new weights,
        "applied": 1.0 or 0.0}`` on the calibration data used to fit them (for ``"sequential"``, "before" is
        measured on the inputs the layer sees once its predecessors are compensated).
    """
    if ridge < 0:
        raise ConfigError(f"compensate: ridge must be >= 0, got {ridge}")
    if method not in METHODS:
        raise ConfigError(f"compensate: unknown method '{method}'; choose from {', '.join(METHODS)}")
    if positions is not None and positions < 1:
        raise ConfigError(f"compensate: positions must be >= 1 or None, got {positions}")
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in data]
    if not batches:
        raise DataError("compensate: needs calibration data, got no batches")
    names = consumers(graph, pruned, removals)
    if not names:
        return {}
    sl = removed_slices(graph, removals)
    flags = [(m, m.training) for m in [*original.modules(), *pruned.modules()]]
    original.eval()
    pruned.eval()
    try:
        if method == "independent":
            return _independent(original, pruned, names, sl, batches, ridge, positions, seed)
        return _sequential(original, pruned, graph, names, sl, batches, ridge, positions, seed, residual)
    finally:
        for m, f in flags:
            m.training = f


def _pick_seed(seed: int, layer: int, batch: int) -> int:
    # One seed per (layer, batch), shared by the original and the pruned model so their columns line up.
    return (seed * 1_000_003 + layer * 10_007 + batch) % (2**31 - 1)


def _following_norms(graph: ChannelGraph, original: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Layer -> the BatchNorm (with running statistics) applied directly and only to its output, if any."""
    out: dict[str, str] = {}
    for node in graph.gm.graph.nodes:
        if node.op != "call_module" or node.target not in names or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module":
            continue
        norm = original.get_submodule(str(user.target))
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats:
            out[str(node.target)] = str(user.target)
    return out


def _shortcut_links(graph: ChannelGraph, original: nn.Module, names: Sequence[str], norms: Mapping[str, str]
                    ) -> dict[str, tuple[str, torch.Tensor]]:
    """Layer -> (module computing the other operand of the addition after its norm, σ/γ of that norm (C,)).

    For ``add(norm(layer(x)), shortcut(...))`` with ``shortcut`` a module (a residual block's identity / padding
    shortcut). Rows whose |γ|/σ is below 1e-3 of the median get σ/γ = 0 (no correction: the branch can barely
    move the sum there).
    """
    out: dict[str, tuple[str, torch.Tensor]] = {}
    adds = (operator.add, operator.iadd, torch.add)
    for node in graph.gm.graph.nodes:
        if node.op != "call_module" or str(node.target) not in norms.values() or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_function" or user.target not in adds or len(user.args) != 2 or user.kwargs:
            continue
        other = user.args[1] if user.args[0] is node else user.args[0]
        if not isinstance(other, fx.Node) or other.op != "call_module":
            continue
        norm = original.get_submodule(str(node.target))
        gain = norm.weight.detach().double().abs() / torch.sqrt(norm.running_var.double() + norm.eps)
        scale = torch.where(gain >= 1e-3 * gain.median(), 1.0 / gain, torch.zeros_like(gain))
        scale = scale * torch.sign(norm.weight.detach().double())
        layer = next(n for n in names if norms.get(n) == str(node.target))
        out[layer] = (str(other.target), scale)
    return out


def _capture(model: nn.Module, inputs: Sequence[str], outputs: Sequence[str], images: torch.Tensor,
             stop: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs of modules ``inputs`` and outputs of modules ``outputs`` (first call each); with ``stop`` the
    forward pass ends as soon as all of them are captured."""
    got_in: dict[str, torch.Tensor] = {}
    got_out: dict[str, torch.Tensor] = {}
    want = len(set(inputs)) + len(set(outputs))

    def check() -> None:
        if stop and len(got_in) + len(got_out) == want:
            raise _Stop

    def pre(mod: nn.Module, inp: tuple[Any, ...], name: str) -> None:
        got_in.setdefault(name, inp[0].detach())
        check()

    def post(mod: nn.Module, inp: tuple[Any, ...], out: torch.Tensor, name: str) -> None:
        got_out.setdefault(name, out.detach())
        check()

    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: pre(m, i, n)) for n in dict.fromkeys(inputs)]
    handles += [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: post(m, i, o, n)) for n in dict.fromkeys(outputs)]
    try:
        model(images)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in inputs if n not in got_in] + [n for n in outputs if n not in got_out]
    if missing:
        raise PruneError(f"compensate: module '{missing[0]}' was not called in the forward pass")
    return got_in, got_out


def _shortcut_cols(s: torch.Tensor, rows: torch.Tensor | None, pick: torch.Tensor | None) -> torch.Tensor:
    """(C, N*P) columns of a shortcut output (N, C, H, W) in the order of :func:`_cols` (image-major)."""
    s = s.flatten(2) if rows is None else s[:, rows].flatten(2)
    if pick is not None:
        s = s[:, :, pick]
    return s.permute(1, 0, 2).reshape(s.shape[1], -1).double()


def _sequential(original: nn.Module, pruned: nn.Module, graph: ChannelGraph, names: list[str],
                sl: Mapping[tuple[str, int], set[int]], batches: list[torch.Tensor], ridge: float,
                positions: int | None, seed: int, residual: bool) -> dict[str, dict[str, float]]:
    names = _execution_order(pruned, names, batches[0])
    norms = _following_norms(graph, original, names)
    links = _shortcut_links(graph, original, names, norms) if residual else {}
    weights = {name: _layer_weights(original, pruned, name, sl) for name in names}
    out_rows = {name: torch.as_tensor(_kept(original.get_submodule(name).weight.shape[0], sl.get((name, 0), set())))
                for name in names}
    # Targets per layer and batch, from one pass of the original model: Y = W_orig X_orig (out, P), plus, for a
    # layer whose norm feeds a residual addition, (σ/γ)·shortcut_orig, so that the fit reproduces the original
    # *sum* (the shortcut of the pruned model, subtracted at solve time, carries the error of the earlier
    # blocks). Kept in the model's dtype: float32 halves the memory (ResNet-56, 1024 images, 128 positions:
    # ~0.4 GB); the products are accumulated in float64.
    targets: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    shortcuts = [links[n][0] for n in names if n in links]
    for bi, images in enumerate(batches):
        x_orig, s_orig = _capture(original, names, shortcuts, images, stop=False)
        if bi == 0:
            # Only a conv whose output positions and channels line up with the shortcut's (N, C, H, W) map.
            for name in [n for n in names if n in links]:
                mod, s = original.get_submodule(name), s_orig[links[name][0]]
                if not (isinstance(mod, nn.Conv2d) and s.dim() == 4 and s.shape[1] == mod.out_channels
                        and s.shape[2] * s.shape[3] == _out_length(mod, x_orig[name])):
                    del links[name]
        for li, name in enumerate(names):
            mod = original.get_submodule(name)
            pick = _pick(mod, x_orig[name], positions, _pick_seed(seed, li, bi))
            y = weights[name][0] @ _cols(mod, x_orig[name], pick)
            if name in links:
                shortcut, scale = links[name]
                y = y + scale[out_rows[name], None] * _shortcut_cols(s_orig[shortcut], out_rows[name], pick)
            targets[name].append(y.to(x_orig[name].dtype))  # float32 for a float32 model, see above
        del x_orig, s_orig
    report: dict[str, dict[str, float]] = {}
    for li, name in enumerate(names):
        mod = pruned.get_submodule(name)
        w_o_mat, plain, shape = weights[name]
        d = plain.shape[1]
        g = torch.zeros(d, d, dtype=torch.float64)
        b = torch.zeros(w_o_mat.shape[0], d, dtype=torch.float64)
        ref = 0.0
        link = links.get(name)
        for bi, images in enumerate(batches):
            x_in, s_out = _capture(pruned, [name], [link[0]] if link else [], images, stop=True)
            x = x_in[name]
            pick = _pick(mod, x, positions, _pick_seed(seed, li, bi))
            a_p = _cols(mod, x, pick)
            y = targets[name][bi].double()
            if link is not None:
                y = y - link[1][out_rows[name], None] * _shortcut_cols(s_out[link[0]], None, pick)
            g += a_p @ a_p.T
            b += y @ a_p.T
            ref += float((y * y).sum())
        targets[name] = []  # free this layer's targets
        report[name] = _solve(mod, ref, b, g, plain, shape, ridge)
        if report[name]["applied"] and name in norms:
            # The layer now approximates the original's output, so the original statistics of the norm that
            # follows it (kept rows) are the right ones for the layers solved after it; statistics recalibrated
            # on the uncompensated output would distort their inputs.
            orig_norm, new_norm = original.get_submodule(norms[name]), pruned.get_submodule(norms[name])
            new_norm.running_mean.copy_(orig_norm.running_mean[out_rows[name]])
            new_norm.running_var.copy_(orig_norm.running_var[out_rows[name]])
    return report


def _independent(original: nn.Module, pruned: nn.Module, names: list[str], sl: Mapping[tuple[str, int], set[int]],
                 batches: list[torch.Tensor], ridge: float, positions: int | None, seed: int
                 ) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, torch.Tensor]] = {}
    for bi, images in enumerate(batches):
        x_orig = _inputs(original, names, images)
        x_pruned = _inputs(pruned, names, images)
        for li, name in enumerate(names):
            mod = pruned.get_submodule(name)
            pick = _pick(mod, x_orig[name], positions, _pick_seed(seed, li, bi))
            a_o = _cols(mod, x_orig[name], pick)
            a_p = _cols(mod, x_pruned[name], pick)
            slot = acc.setdefault(name, {"G": torch.zeros(a_p.shape[0], a_p.shape[0], dtype=torch.float64),
                                         "C": torch.zeros(a_o.shape[0], a_p.shape[0], dtype=torch.float64),
                                         "O": torch.zeros(a_o.shape[0], a_o.shape[0], dtype=torch.float64)})
            slot["G"] += a_p @ a_p.T
            slot["C"] += a_o @ a_p.T
            slot["O"] += a_o @ a_o.T
    report: dict[str, dict[str, float]] = {}
    for name in names:
        w_o_mat, plain, shape = _layer_weights(original, pruned, name, sl)
        g, c, o = acc[name]["G"], acc[name]["C"], acc[name]["O"]
        if plain.shape[1] != g.shape[0]:
            raise ConfigError(f"compensate: layer '{name}' does not match the removals")
        ref = float(torch.trace(w_o_mat @ o @ w_o_mat.T))
        report[name] = _solve(pruned.get_submodule(name), ref, w_o_mat @ c, g, plain, shape, ridge)
    return report
