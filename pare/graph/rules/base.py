"""Shared vocabulary of the operator rules: channel values, parameter uses, the analysis context, keep masks.

A rule sees a traced node, reads its inputs' :class:`Value` s from the :class:`Context` and sets the node's output
value; at surgery it reads the surviving positions from a :class:`Kept` (the keep masks are passed to every
rebuild, never stored on the graph).

``Value.removed`` is what a *removed* channel holds at that tensor (docs/design.md, "What removing a channel
means"): a removed channel's producer writes zero; operators downstream then compute from that zero. ``"zero"``:
still zero; ``"const"``: a data-independent constant (``sigmoid(0) = 0.5``, ``elu(x) + 1``), which surgery folds
into the consumer's bias; ``"dynamic"``: a value that depends on the input (a zero plus a tensor broadcast over
channels, a constant after dropout in train mode), which no surgery can reproduce, so consumers freeze it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pare.graph.layout import Layout, Partition
from pare.graph.trace import TensorMeta

ZERO, CONST, DYNAMIC = "zero", "const", "dynamic"
_RANK = {ZERO: 0, CONST: 1, DYNAMIC: 2}


def worst(*states: str) -> str:
    """The least exact of several removed-channel states (zero < const < dynamic)."""
    return max(states, key=_RANK.__getitem__) if states else ZERO


@dataclass(frozen=True)
class Value:
    """The channel layout of one tensor (its dim 1). ``expand`` > 1: a flattened tensor whose channel c occupies
    features ``[c*expand, (c+1)*expand)``. ``removed``: what a removed channel holds here (module docstring)."""

    layout: Layout
    expand: int = 1
    removed: str = ZERO

    def with_removed(self, state: str) -> Value:
        return self if state == self.removed else replace(self, removed=state)


@dataclass(frozen=True)
class Use:
    """A parameter dimension (or a module's channel count) that follows a layout; becomes a group member."""

    module: str
    param: str
    dim: int
    layout: Layout
    expand: int
    role: str  # "out" (producer), "in" (consumer), "norm" (per-channel), "param", "pad"


class Kept:
    """The surviving channels of one removal request: a boolean keep mask per space."""

    def __init__(self, masks: list[np.ndarray]) -> None:
        self.masks = masks

    def kept(self, value: Value | None) -> np.ndarray:
        """Positions (along the tensor's dim 1) that survive, as an int64 array."""
        if value is None:
            return np.zeros(0, dtype=np.int64)
        parts = []
        pos = 0
        for s in value.layout:
            parts.append(np.flatnonzero(self.masks[s.space][s.start : s.start + s.length]) + pos)
            pos += s.length
        ch = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if value.expand == 1:
            return ch.astype(np.int64)
        return (ch[:, None] * value.expand + np.arange(value.expand)[None, :]).reshape(-1).astype(np.int64)

    def removed(self, value: Value | None) -> np.ndarray:
        """Positions (along dim 1) that are removed, as an int64 array."""
        if value is None:
            return np.zeros(0, dtype=np.int64)
        size = sum(s.length for s in value.layout) * value.expand
        return np.setdiff1d(np.arange(size, dtype=np.int64), self.kept(value))

    def kept_count(self, layout: Layout) -> int:
        return int(sum(self.masks[s.space][s.start : s.start + s.length].sum() for s in layout))


class Context:
    """Analysis state shared by the rules."""

    def __init__(self, gm: fx.GraphModule, meta: dict[fx.Node, Any]) -> None:
        self.gm = gm
        self.meta = meta
        self.part = Partition()
        self.values: dict[fx.Node, Value | list[Value | None] | None] = {}
        self.uses: list[Use] = []
        self.module_in: dict[str, Layout] = {}
        self.module_out: dict[str, Layout] = {}
        self.param_layouts: dict[tuple[str, int], Layout] = {}
        #: per-channel parameters added to channels (a bias): zeroed with the channel in the masked reference
        self.additive_params: set[tuple[str, int]] = set()
        #: consumer module path -> the input value it reads removed constants from (folded at surgery)
        self.const_inputs: dict[str, Value] = {}
        self.const_nodes: dict[str, fx.Node] = {}
        self.consumer_calls: dict[str, int] = {}
        #: call_module nodes whose removed output channels the masked reference zeroes (producers, norms)
        self.masked_outputs: list[fx.Node] = []
        self.warnings: list[str] = []

    def value(self, arg: Any) -> Value | None:
        if isinstance(arg, fx.Node):
            v = self.values.get(arg)
            return v if isinstance(v, Value) else None
        return None

    def tensor_meta(self, arg: Any) -> TensorMeta | None:
        if isinstance(arg, fx.Node):
            m = self.meta.get(arg)
            return m if isinstance(m, TensorMeta) else None
        return None

    def fresh(self, node: fx.Node, kind: str, owner: str, reason: str | None = None) -> Value | None:
        """A new space for the node's output channels (frozen when ``reason`` is given)."""
        m = self.meta.get(node)
        if not isinstance(m, TensorMeta) or not m.batched or m.ndim < 2:
            return None
        layout = self.part.new_layout(m.shape[1], kind, owner)
        if reason:
            self.part.freeze(layout, reason)
        return Value(layout)

    def opaque(self, node: fx.Node, reason: str) -> None:
        """Freeze every channel the node reads and give its output frozen channels."""
        for arg in flat_nodes((node.args, node.kwargs)):
            v = self.value(arg)
            if v is not None:
                self.part.freeze(v.layout, reason)
            elif isinstance(self.values.get(arg), list):
                for item in self.values[arg]:  # type: ignore[union-attr]
                    if item is not None:
                        self.part.freeze(item.layout, reason)
        m = self.meta.get(node)
        if isinstance(m, (tuple, list)):
            self.values[node] = [
                Value(self.part.new_layout(t.shape[1], "opaque", node.name))
                if isinstance(t, TensorMeta) and t.batched and t.ndim >= 2 else None
                for t in m
            ]
            for v in self.values[node]:  # type: ignore[union-attr]
                if v is not None:
                    self.part.freeze(v.layout, reason)
        else:
            self.values[node] = self.fresh(node, "opaque", node.name, reason)
        if reason not in self.warnings:
            self.warnings.append(reason)

    def module_input(self, path: str, layout: Layout) -> None:
        """A module with per-channel state called more than once couples the inputs of all its calls."""
        if path in self.module_in:
            self.part.unify(self.module_in[path], layout)
        else:
            self.module_in[path] = layout

    def producer_output(self, path: str, size: int) -> Layout:
        if path not in self.module_out:
            self.module_out[path] = self.part.new_layout(size, "producer", path)
        return self.module_out[path]

    def consumer_input(self, node: fx.Node, v: Value, foldable: bool) -> None:
        """Record that consumer ``path`` reads ``v``; freeze what its removal could not reproduce.

        ``foldable``: a constant on a removed input channel adds the same amount to every output position, so it
        can be folded into the bias (no zero padding around the constant, a single call of the module).
        """
        path = str(node.target)
        calls = self.consumer_calls[path] = self.consumer_calls.get(path, 0) + 1
        if calls > 1 and path in self.const_inputs:  # one bias cannot fold the constants of several calls
            self.part.freeze(self.const_inputs[path].layout, f"'{path}' is called several times and reads "
                                                             "channels that are a non-zero constant when removed")
        if v.removed == DYNAMIC:
            self.part.freeze(v.layout, f"'{path}' reads channels whose removal would leave an input-dependent "
                                       "value (an add of a tensor broadcast over channels, or dropout of a constant)")
        elif v.removed == CONST:
            if not foldable or calls > 1:
                self.part.freeze(v.layout, f"'{path}' reads channels that are a non-zero constant when removed "
                                           "(e.g. sigmoid(0) = 0.5) and cannot fold it exactly (zero padding)")
            else:
                self.const_inputs[path] = v
                self.const_nodes[path] = node


def flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, fx.Node) else a)
    return out


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def slice_param(p: torch.Tensor | None, dim: int, idx: np.ndarray) -> torch.Tensor | None:
    if p is None:
        return None
    t = torch.as_tensor(idx, dtype=torch.long, device=p.device)
    new = p.detach().index_select(dim, t).clone()
    if isinstance(p, nn.Parameter):
        return nn.Parameter(new, requires_grad=p.requires_grad)
    return new


def clone_module(m: nn.Module) -> nn.Module:
    """A shallow copy of a module with its own parameter, buffer, submodule and hook dictionaries.

    Parametrizations (``torch.nn.utils.parametrize``) are deep-copied: assigning a sliced tensor to a parametrized
    attribute goes through the parametrization's ``right_inverse``, which must not write into the original's.
    """
    new = m.__class__.__new__(m.__class__)
    new.__dict__ = m.__dict__.copy()
    for key, val in m.__dict__.items():
        if isinstance(val, OrderedDict):
            new.__dict__[key] = OrderedDict(val)
        elif isinstance(val, dict):
            new.__dict__[key] = dict(val)
    if "parametrizations" in m._modules:
        new._modules["parametrizations"] = copy.deepcopy(m._modules["parametrizations"])
    return new


def unshare(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` its own copy of every parameter and buffer it still shares with ``old`` (a BatchNorm's
    ``num_batches_tracked``, a bias nobody sliced), so that training the pruned model never writes into the
    user's."""
    for store in ("_parameters", "_buffers"):
        mine, theirs = getattr(new, store), getattr(old, store)
        for name, t in mine.items():
            if t is not None and theirs.get(name) is t:
                copy_ = t.detach().clone()
                mine[name] = nn.Parameter(copy_, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                    else copy_


def _weight_norm_hook(m: nn.Module, name: str) -> Any:
    for hook in m._forward_pre_hooks.values():
        if type(hook).__name__ == "WeightNorm" and getattr(hook, "name", None) == name:
            return hook
    return None


def current(m: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor ``m.name`` as the module's forward sees it (a parametrized or weight-normed weight computed)."""
    hook = _weight_norm_hook(m, name)
    if hook is not None:
        return hook.compute_weight(m)
    return getattr(m, name, None)


def set_param(m: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set ``m.name`` to ``value``, through a parametrization or an old-style weight-norm hook when there is one.

    Parametrized tensors get ``value`` through ``right_inverse`` (for weight norm: g = |value|, v = value), so that
    the computed tensor equals ``value`` exactly; :func:`clone_module` gave the clone its own parametrization.
    """
    if value is None:
        return
    hook = _weight_norm_hook(m, name)
    if hook is not None:
        v = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        gn = torch.norm_except_dim(value.detach(), 2, hook.dim).clone()
        m._parameters[name + "_g"] = nn.Parameter(gn, requires_grad=value.requires_grad)
        m._parameters[name + "_v"] = v
        setattr(m, name, hook.compute_weight(m))
        return
    parametrized = getattr(m, "parametrizations", None)
    if parametrized is not None and name in parametrized:
        with torch.no_grad():
            setattr(m, name, value.detach())
        return
    if name in m._parameters:
        m._parameters[name] = value  # type: ignore[assignment]
    elif name in m._buffers:
        m._buffers[name] = value
    else:
        setattr(m, name, value)


class ModuleRule:
    """How a module type moves channels (``analyze``) and changes when channels go (``rebuild``)."""

    def analyze(self, ctx: Context, node: fx.Node, m: nn.Module) -> None:
        raise NotImplementedError

    def rebuild(self, ctx: Context, node: fx.Node, m: nn.Module, keep: Kept) -> nn.Module | None:
        return None


def input_value(ctx: Context, node: fx.Node) -> Value | None:
    return ctx.value(node.args[0]) if node.args else None


FunctionResult = tuple[str, Any, tuple[Any, ...], dict[str, Any]] | None
FunctionRule = Callable[[Context, fx.Node], None]
FunctionRebuild = Callable[[Context, fx.Node, Kept], FunctionResult]
