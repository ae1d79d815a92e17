"""Equivalence check: the pruned model against the original with the removed channels masked to zero.

"Masked" means: in every traced tensor, the positions that hold removed channels are set to zero after the
operator that produced it. Because every operator pare prunes through acts on each channel separately (or sums
over channels, where a zero contributes nothing), the pruned model must then produce, at every node, exactly the
surviving channels of the masked original; the check runs both graphs node by node and names the first node where
they diverge beyond a dtype-appropriate tolerance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pare.errors import EquivalenceError
from pare.graph import rules

if TYPE_CHECKING:
    from pare.graph.graph import ChannelGraph

#: (relative, absolute) tolerance per dtype, relative to the largest magnitude of the reference tensor.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-4, 1e-6),
    torch.float16: (3e-2, 1e-3),
    torch.bfloat16: (6e-2, 1e-2),
}


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _execute(node: fx.Node, env: dict[fx.Node, Any], root: nn.Module) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        return _fetch_attr(root, str(node.target))
    if node.op == "call_module":
        return root.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)
    if node.op == "output":
        return args[0]
    raise AssertionError(f"unexpected node op {node.op}")


class _Masker:
    def __init__(self, graph: ChannelGraph) -> None:
        self.ctx = graph.ctx
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def indices(self, value: rules.Value, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(value)
        if key not in self.cache:
            kept = self.ctx.kept(value)
            removed = np.setdiff1d(np.arange(size), kept)
            self.cache[key] = (torch.as_tensor(kept), torch.as_tensor(removed))
        kept_t, removed_t = self.cache[key]
        return kept_t.to(device), removed_t.to(device)

    def mask(self, out: Any, value: Any) -> Any:
        if isinstance(value, list) and isinstance(out, (tuple, list)):
            return type(out)(self.mask(o, v) for o, v in zip(out, value))
        if not isinstance(value, rules.Value) or not isinstance(out, torch.Tensor) or out.dim() < 2:
            return out
        _, removed = self.indices(value, out.shape[1], out.device)
        if removed.numel() == 0:
            return out
        return out.index_fill(1, removed, 0)

    def select(self, ref: Any, value: Any) -> Any:
        if isinstance(value, list) and isinstance(ref, (tuple, list)):
            return type(ref)(self.select(r, v) for r, v in zip(ref, value))
        if not isinstance(value, rules.Value) or not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            return ref
        kept, _ = self.indices(value, ref.shape[1], ref.device)
        return ref.index_select(1, kept)


def _max_violation(ref: Any, got: Any) -> tuple[float, float] | None:
    """(max abs difference, allowed) of the first offending tensor pair, or None when all are within tolerance."""
    if isinstance(ref, (tuple, list)) and isinstance(got, (tuple, list)):
        for r, g in zip(ref, got):
            bad = _max_violation(r, g)
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
    diff = float((ref.double() - got.double()).abs().max())
    allowed = atol + rtol * float(ref.double().abs().max())
    return None if diff <= allowed else (diff, allowed)


def verify_equivalence(graph: ChannelGraph, pruned: nn.Module, pruned_graph: fx.Graph) -> None:
    """Raise :class:`EquivalenceError` unless ``pruned`` matches the masked original on the example inputs."""
    masker = _Masker(graph)
    inputs = graph.example_inputs
    original = graph.gm
    root_new: nn.Module = pruned
    modes = (original.training, pruned.training)
    original.eval()
    pruned.eval()
    try:
        with torch.no_grad():
            env_o: dict[fx.Node, Any] = {}
            env_n: dict[fx.Node, Any] = {}
            inputs_iter = iter(inputs)
            final_ref: Any = None
            for node_o, node_n in zip(original.graph.nodes, pruned_graph.nodes):
                if node_o.op == "placeholder":
                    x = next(inputs_iter)
                    env_o[node_o] = env_n[node_n] = x
                    continue
                out_o = masker.mask(_execute(node_o, env_o, original), graph.ctx.values.get(node_o))
                out_n = _execute(node_n, env_n, root_new)
                env_o[node_o], env_n[node_n] = out_o, out_n
                if node_o.op == "output":
                    final_ref = out_o
                    continue
                if node_o.op == "get_attr":
                    continue  # sliced parameters are checked through the operators that use them
                bad = _max_violation(masker.select(out_o, graph.ctx.values.get(node_o)), out_n)
                if bad is not None:
                    diff, allowed = bad
                    raise EquivalenceError(
                        f"pruned model diverges from the masked original at node '{node_o.name}' "
                        f"({node_o.op} {node_o.target}): max |diff| {diff:.3g} > {allowed:.3g}",
                        node=node_o.name,
                        max_abs_diff=diff,
                    )
            direct = pruned(*inputs)
            bad = _max_violation(_flatten(final_ref), _flatten(direct))
            if bad is not None:
                raise EquivalenceError(
                    f"the pruned model's forward() differs from its graph: max |diff| {bad[0]:.3g}",
                    node="output",
                    max_abs_diff=bad[0],
                )
    finally:
        original.train(modes[0])
        pruned.train(modes[1])


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _flatten(item)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flatten(x[k])]
    return [x]
