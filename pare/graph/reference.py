"""The masked reference: the user's own model with the removed channels zeroed where they are produced.

This is the definition of removal that verification checks and surgery must honour (docs/design.md, "What removing a
channel means"). A deep copy of the model gets, for every call of a producer (conv, linear, depthwise conv) and of a
per-channel norm (BatchNorm, GroupNorm, InstanceNorm, PReLU, FrozenBatchNorm2d), a forward hook that sets the removed
channels of its output to zero; per-channel parameters *added* to a channel (a bias in the user's code) are zeroed
at the removed channels. Nothing else changes: the copy runs the model's own ``forward``. Forward hooks work the same
for parametrized or weight-normed layers and for norms without affine parameters, where zeroing weights would not
zero the output.

Downstream of a producer a removed channel is whatever the model computes from that zero: zero through ReLU, pooling
or another norm, but ``sigmoid(0) = 0.5`` or ``elu(x) + 1 = 1``. Such a constant reaches the next consumer; surgery
folds ``constant * sum of the consumer's weights`` into the consumer's bias (Ye et al. 2018's constant-channel
folding, methods.md §2.2), which is exact where the consumer sees the constant at every position (no zero padding);
the analysis freezes the channels where it would not be.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from pare.errors import PruneError
from pare.graph import ops
from pare.graph.rules import Kept, Value
from pare.graph.rules.base import current, set_param

if TYPE_CHECKING:
    from pare.graph.graph import ChannelGraph

#: Dropout-like function names, switched off (with their modules) for the train-mode comparison.
DROPOUT_FUNCTIONS = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
                               "feature_alpha_dropout", "rrelu"})
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                    nn.RReLU)


def _zero_hook(removed: torch.Tensor) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.dim() >= 2:
            return out.index_fill(1, removed.to(out.device), 0)
        return out

    return hook


def light_copy(model: nn.Module) -> nn.Module:
    """A copy of every module object of ``model`` (own parameter, buffer, submodule and hook dictionaries, own
    buffers) that shares the parameter tensors, which a forward pass only reads. Much cheaper than a deep copy of
    the weights; hooks, modes and buffer updates on the copy never reach ``model``."""
    memo: dict[int, nn.Module] = {}

    def visit(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = object.__new__(type(m))  # not type(m).__new__: a GraphModule would get a fresh class
        memo[id(m)] = new
        new.__dict__ = m.__dict__.copy()
        for key, val in m.__dict__.items():
            if isinstance(val, dict):
                new.__dict__[key] = type(val)(val)
        new._buffers = type(m._buffers)(
            (k, b.clone() if b is not None else None) for k, b in m._buffers.items()
        )
        new._modules = type(m._modules)((k, visit(c) if c is not None else None) for k, c in m._modules.items())
        return new

    return visit(model)


def build_reference(graph: ChannelGraph, keep: Kept) -> nn.Module:
    """A copy of ``graph.model`` whose removed channels are zeroed where produced (module docstring)."""
    reference = light_copy(graph.model)
    ctx = graph.ctx
    hooked: set[str] = set()
    for node in ctx.masked_outputs:
        path = str(node.target)
        value = ctx.values.get(node)
        if path in hooked or not isinstance(value, Value):
            continue
        removed = keep.removed(value)
        if removed.size:
            hooked.add(path)
            reference.get_submodule(path).register_forward_hook(_zero_hook(torch.as_tensor(removed)))
    for (target, dim), layout in ctx.param_layouts.items():
        if (target, dim) not in ctx.additive_params:
            continue
        removed = keep.removed(Value(layout))
        owner_path, _, name = target.rpartition(".")
        try:
            tensor = getattr(reference.get_submodule(owner_path) if owner_path else reference, name)
        except AttributeError:
            continue  # a constant fx created while tracing: the rules froze its channels
        if removed.size and isinstance(tensor, torch.Tensor):
            owner = reference.get_submodule(owner_path) if owner_path else reference
            zeroed = tensor.detach().index_fill(dim, torch.as_tensor(removed, device=tensor.device), 0)
            set_param(owner, name, nn.Parameter(zeroed) if isinstance(tensor, nn.Parameter) else zeroed)
    return reference


def dropout_scopes(graph: ChannelGraph) -> set[str]:
    """Paths of the modules whose own ``forward`` calls a dropout-like function (their training flag drives it)."""
    scopes: set[str] = set()
    for node in graph.gm.graph.nodes:
        if node.op in ("call_function", "call_method") and ops.canonical_name(node.op, node.target) in \
                DROPOUT_FUNCTIONS:
            scopes.add(str(node.meta.get("pare_scope", "")))
    return scopes


@contextmanager
def mode(model: nn.Module, training: bool, quiet_scopes: set[str] = frozenset()) -> Iterator[None]:  # type: ignore[assignment]
    """Put every module of ``model`` in ``training`` mode, dropout off when training (its random draws depend on
    the tensor size, so a pruned model cannot draw the same ones), and restore every flag and buffer afterwards."""
    flags = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if training else []
    model.train(training)
    if training:
        for path, m in model.named_modules():
            if isinstance(m, _DROPOUT_MODULES) or path in quiet_scopes:
                m.training = False
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def fold_constants(graph: ChannelGraph, keep: Kept, replacements: dict[int, nn.Module]) -> None:
    """Add to each consumer's bias what the removed constant input channels contributed (module docstring).

    ``replacements`` maps ``id(original module)`` to its rebuilt module, which is changed in place.
    Raises PruneError if a channel the analysis called constant is not (a rule is wrong).
    """
    todo = {path: v for path, v in graph.ctx.const_inputs.items() if keep.removed(v).size}
    if not todo:
        return
    reference = build_reference(graph, keep)
    seen: dict[str, torch.Tensor] = {}

    def capture(path: str) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, args: Any) -> None:
            seen.setdefault(path, args[0].detach())

        return hook

    for path in todo:
        reference.get_submodule(path).register_forward_pre_hook(capture(path))
    with mode(reference, False), torch.no_grad():
        reference(*graph.example_inputs)
    for path, value in todo.items():
        removed = torch.as_tensor(keep.removed(value))
        x = seen[path].index_select(1, removed).transpose(0, 1).reshape(len(removed), -1).double()
        const = x.mean(1)
        if (x - const[:, None]).abs().max() > 1e-6 * (1 + float(const.abs().max())):
            raise PruneError(f"pare: removed input channels of '{path}' are not constant; cannot fold them")
        original = graph.model.get_submodule(path)
        new = replacements[id(original)]
        weight = current(original, "weight")
        assert weight is not None
        w = weight.detach().index_select(1, removed.to(weight.device)).double()
        delta = (w.sum(tuple(range(2, w.dim()))) * const.to(w.device)).sum(1) if w.dim() > 2 else w @ const
        keep_out = torch.as_tensor(keep.kept(graph.ctx.value(graph.ctx.const_nodes[path])), device=delta.device)
        delta = delta.index_select(0, keep_out)
        bias = getattr(new, "bias", None)
        base = bias.detach().double() if bias is not None else torch.zeros_like(delta)
        if bias is None:
            new.bias = nn.Parameter((base + delta).to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            set_param(new, "bias", nn.Parameter((base + delta).to(bias.dtype), requires_grad=bias.requires_grad))


def execute(node: fx.Node, env: dict[fx.Node, Any], root: nn.Module, fallback: nn.Module) -> Any:
    """Run one fx node with its arguments from ``env`` and its modules/attributes from ``root``."""
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        obj: Any = root
        try:
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            obj = fallback
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
        return obj
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
