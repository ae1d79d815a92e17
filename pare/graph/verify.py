"""Equivalence check: the pruned model against the masked reference, in eval and in train mode.

The reference is independent of the surgery: the user's own model (a deep copy), its removed channels zeroed where
they are produced, run through its own ``forward`` (:mod:`pare.graph.reference`). The pruned model must produce the
same outputs on the example inputs, in eval mode and in train mode (same seed; dropout switched off in both, since
its random draws depend on the tensor size). When they differ, a node-by-node run of the traced graph on the
reference and on the pruned model names the first node whose surviving channels diverge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from pare.errors import EquivalenceError
from pare.graph.reference import build_reference, dropout_scopes, execute, mode
from pare.graph.rules import Kept, Value

if TYPE_CHECKING:
    from pare.graph.graph import ChannelGraph

#: (relative, absolute) tolerance per dtype, relative to the largest magnitude of the reference tensor.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-4, 1e-6),
    torch.float16: (3e-2, 1e-3),
    torch.bfloat16: (6e-2, 1e-2),
}


#: Train mode normalises with batch statistics, whose small variances (a batch of one, 2x2 maps) amplify rounding.
TRAIN_SLACK = 10.0


def max_violation(ref: Any, got: Any, slack: float = 1.0) -> tuple[float, float] | None:
    """(max abs difference, allowed) of the first offending tensor pair, or None when all are within tolerance
    (``slack`` times the dtype's tolerance)."""
    if isinstance(ref, dict) and isinstance(got, dict):
        ref, got = [ref[k] for k in sorted(ref)], [got.get(k) for k in sorted(ref)]
    if isinstance(ref, (tuple, list)) and isinstance(got, (tuple, list)):
        if len(ref) != len(got):
            return (float("inf"), 0.0)
        for r, g in zip(ref, got):
            bad = max_violation(r, g, slack)
            if bad is not None:
                return bad
        return None
    if not isinstance(ref, torch.Tensor) or not isinstance(got, torch.Tensor):
        return None
    if ref.shape != got.shape:
        return (float("inf"), 0.0)
    if not ref.is_floating_point():
        return None if torch.equal(ref, got) else (float("inf"), 0.0)
    if ref.numel() == 0:
        return None
    rtol, atol = TOLERANCE.get(ref.dtype, (1e-4, 1e-6))
    diff = (ref.double() - got.double()).abs()
    worst = float(diff.nan_to_num(float("inf")).max()) if torch.isnan(diff).any() else float(diff.max())
    allowed = slack * (atol + rtol * float(ref.double().abs().max()))
    return None if worst <= allowed else (worst, allowed)


def _select(ref: Any, value: Any, keep: Kept) -> Any:
    if isinstance(value, list) and isinstance(ref, (tuple, list)):
        return type(ref)(_select(r, v, keep) for r, v in zip(ref, value))
    if not isinstance(value, Value) or not isinstance(ref, torch.Tensor) or ref.dim() < 2:
        return ref
    return ref.index_select(1, torch.as_tensor(keep.kept(value), device=ref.device))


def first_divergence(graph: ChannelGraph, keep: Kept, reference: nn.Module, pruned: nn.Module,
                     pruned_graph: fx.Graph, training: bool = False) -> EquivalenceError | None:
    """Run the traced graph on the reference and the pruned graph on the pruned model, node by node; the error
    naming the first node whose surviving channels differ, or None."""
    env_o: dict[fx.Node, Any] = {}
    env_n: dict[fx.Node, Any] = {}
    inputs = iter(graph.example_inputs)
    quiet = dropout_scopes(graph)
    with mode(reference, training, quiet), mode(pruned, training, quiet), torch.no_grad():
        for node_o, node_n in zip(graph.gm.graph.nodes, pruned_graph.nodes):
            if node_o.op == "placeholder":
                env_o[node_o] = env_n[node_n] = next(inputs)
                continue
            env_o[node_o] = execute(node_o, env_o, reference, graph.gm)
            env_n[node_n] = execute(node_n, env_n, pruned, graph.gm)
            if node_o.op in ("get_attr", "output"):
                continue
            bad = max_violation(_select(env_o[node_o], graph.ctx.values.get(node_o), keep), env_n[node_n],
                                TRAIN_SLACK if training else 1.0)
            if bad is not None:
                return EquivalenceError(
                    f"pruned model diverges from the masked reference at node '{node_o.name}' "
                    f"({node_o.op} {node_o.target}): max |diff| {bad[0]:.3g} > {bad[1]:.3g}",
                    node=node_o.name,
                    max_abs_diff=bad[0],
                )
    return None


def _train_inputs(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
    """The top-left quarter (half height, half width) of large 4-D example inputs, or None to use them whole.

    Why: the train-mode run costs two more forward passes; on large inputs a quarter of the positions exercises the
    same code paths (batch statistics, training-flag branches) at a quarter of the cost, which keeps a verified
    ResNet-50 prune within twice the unverified time (bench/verify_cost.py)."""
    if not all(t.dim() == 4 and t.shape[2] >= 64 and t.shape[3] >= 64 for t in inputs):
        return None
    return tuple(t[:, :, : t.shape[2] // 2, : t.shape[3] // 2].contiguous() for t in inputs)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], training: bool, quiet: set[str]) -> Any:
    with torch.inference_mode(), mode(model, training, quiet):
        return model(*inputs)


def verify_equivalence(graph: ChannelGraph, pruned: nn.Module, pruned_graph: fx.Graph, keep: Kept) -> None:
    """Raise :class:`EquivalenceError` unless ``pruned`` matches the masked reference on the example inputs, in
    eval and in train mode (train mode on the top-left quarter of large image inputs when the model accepts it).
    Neither the user's model nor ``pruned`` is changed (modes and buffers restored)."""
    reference = build_reference(graph, keep)
    quiet = dropout_scopes(graph)
    for training in (False, True):
        inputs = graph.example_inputs
        want: Any = None
        if training and (small := _train_inputs(inputs)) is not None:
            try:
                want, inputs = _run(reference, small, True, quiet), small
            except (RuntimeError, ValueError):
                want = None  # a head that needs the full size: use the whole inputs
        try:
            if want is None:
                want = _run(reference, inputs, training, quiet)
        except (RuntimeError, ValueError):
            if training:
                continue  # e.g. BatchNorm1d on a batch of one cannot run in train mode: eval is checked
            raise
        got = _run(pruned, inputs, training, quiet)
        bad = max_violation(want, got, TRAIN_SLACK if training else 1.0)
        if bad is None:
            continue
        diagnosis = first_divergence(graph, keep, reference, pruned, pruned_graph, training)
        if diagnosis is not None:
            raise diagnosis
        where = "train" if training else "eval"
        raise EquivalenceError(
            f"pruned model's output differs from the masked reference in {where} mode: max |diff| {bad[0]:.3g} > "
            f"{bad[1]:.3g}",
            node="output",
            max_abs_diff=bad[0],
        )
