"""Folding constant channels into their consumers, and removing them through the engine (methods.md §2.2).

A channel whose BatchNorm scale is exactly zero outputs the constant β (γ·x̂ + β with γ = 0), and after its
activation the constant ``c = act(β)``. Each consumer (a conv or linear layer reading that channel) then receives
the constant input ``c`` on that channel, which adds ``Δᵢ = c·Σ_{u,v} W'[i, j, u, v]`` to every output position.
Folding moves ``Δ`` into the consumer: into its following BatchNorm's running mean (``running_mean -= Δ``) when
there is one and the consumer has no bias, else into the consumer's bias (``bias += Δ``). The channel can then
be removed physically, with the same outputs.

**Border effect.** A zero-padded consumer conv does not see the constant at the padded border positions: there
the true contribution is ``c`` times the sum of the *in-bounds* kernel taps only, while ``Δ`` assumes all taps.
The folded model therefore equals the original exactly on interior pixels (those whose receptive field does not
touch the padding of the consumer, widened by every later padded layer) and differs at the border. The same
holds for an average pool with ``count_include_pad``. This is the official code's behaviour (it ignores padding);
:func:`interior_difference` measures both the interior and the whole-map difference. Channels with
``act(β) == 0`` (e.g. β ≤ 0 before a ReLU) fold to ``Δ = 0`` and are removed with no change anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pare.errors import PruneError
from pare.graph import ChannelGraph, Group, Member, ops

#: Element-wise activations: a constant input maps to the activation of that constant.
_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.ELU,
    nn.Mish,
)
_ACT_FUNCTIONS = frozenset(
    {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardtanh", "leaky_relu", "elu", "mish"}
)
#: Operators that leave a spatially constant channel unchanged (up to the padding border effect).
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
)
_PASS_FUNCTIONS = frozenset(
    {"dropout", "dropout2d", "flatten", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
     "contiguous", "clone"}
)
#: Positively homogeneous activations: act(α·x) = α·act(x) for α > 0 (needed by the γ/β rescaling trick).
HOMOGENEOUS_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, *_PASS_MODULES)
HOMOGENEOUS_FUNCTIONS = frozenset({"relu", "leaky_relu"} | _PASS_FUNCTIONS)


def is_residual_group(group: Group) -> bool:
    """True for a group that couples a residual sum: several producers or zero-padded (pad) channels."""
    return len(group.producers()) > 1 or any(m.role == "pad" for m in group.members)


def bn_member(graph: ChannelGraph, group: Group) -> Member | None:
    """The affine BatchNorm scale (``weight``) member of a single-producer group, or None."""
    for m in group.members:
        if m.role == "norm" and m.param == "weight":
            module = graph.model.get_submodule(m.module)
            if isinstance(module, _BatchNorm) and module.affine:
                return m
    return None


def penalised_groups(graph: ChannelGraph) -> list[tuple[Group, Member]]:
    """Groups whose channels Ye et al.'s method sparsifies: prunable, one producer conv, not a residual sum,
    with an affine BatchNorm. For a CIFAR ResNet these are exactly the first conv of each block (the official
    code gives only ``c0`` a γ; methods.md §2.4)."""
    out: list[tuple[Group, Member]] = []
    for g in graph.prunable_groups:
        if is_residual_group(g) or len(g.producers()) != 1 or g.block != 1:
            continue
        bn = bn_member(graph, g)
        if bn is not None:
            out.append((g, bn))
    return out


def channel_slice(member: Member, i: int) -> slice:
    """The slice of ``member``'s dim that holds group channel ``i``."""
    start = member.offset + i * member.stride
    return slice(start, start + member.stride)


def _node_of(graph: ChannelGraph, path: str) -> fx.Node:
    for n in graph.gm.graph.nodes:
        if n.op == "call_module" and n.target == path:
            return n
    raise PruneError(f"module '{path}' is not called in the traced graph")


def _consumer_paths(group: Group) -> set[str]:
    return {m.module for m in group.members if m.role == "in"}


def channel_constants(graph: ChannelGraph, group: Group, bn: Member, homogeneous_only: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Per consumer path, the value each BN channel has at that consumer's input when the BN outputs the
    constant ``β`` (i.e. γ = 0): β pushed through the activations and pools between the BN and the consumer.

    Returns tensors of shape (num_features of the BN,), in BN channel order. Raises PruneError when the path
    from the BN to a consumer passes through an operator whose effect on a constant is not known (a residual
    addition, a concatenation, ...). With ``homogeneous_only`` only positively homogeneous operators are
    accepted (ReLU, LeakyReLU, pools), as the γ/β rescaling trick requires.
    """
    module = graph.model.get_submodule(bn.module)
    assert isinstance(module, _BatchNorm)
    consumers = _consumer_paths(group)
    start = _node_of(graph, bn.module)
    found: dict[str, torch.Tensor] = {}
    stack: list[tuple[fx.Node, torch.Tensor]] = [(start, module.bias.detach().clone())]
    while stack:
        node, value = stack.pop()
        for user in node.users:
            if user.op == "call_module" and str(user.target) in consumers:
                found[str(user.target)] = value
                continue
            stack.append((user, _apply_constant(graph, user, node, value, homogeneous_only)))
    missing = consumers - set(found)
    if missing:
        raise PruneError(f"group '{group.id}': consumers {sorted(missing)} are not reached from '{bn.module}'")
    return found


def _apply_constant(graph: ChannelGraph, node: fx.Node, source: fx.Node, value: torch.Tensor,
                    homogeneous_only: bool) -> torch.Tensor:
    """``value`` (C,) after ``node`` when its input ``source`` is spatially constant per channel."""
    if node.op == "call_module":
        m = graph.gm.get_submodule(str(node.target))
        if isinstance(m, _PASS_MODULES):
            return value
        if isinstance(m, _ACT_MODULES) and (not homogeneous_only or isinstance(m, HOMOGENEOUS_MODULES)):
            with torch.no_grad():
                return m(value.view(1, -1, 1, 1)).reshape(-1)
    elif node.op in ("call_function", "call_method") and node.args and node.args[0] is source:
        name = ops.canonical_name(node.op, node.target)
        if name in _PASS_FUNCTIONS:
            return value
        if name in _ACT_FUNCTIONS and (not homogeneous_only or name in HOMOGENEOUS_FUNCTIONS):
            fn = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target))
            kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
            with torch.no_grad():
                return fn(value.view(1, -1, 1, 1).clone(), *node.args[1:], **kwargs).reshape(-1)  # type: ignore
    raise PruneError(f"cannot propagate a constant channel through '{node.name}' ({node.op} {node.target})")


def _following_bn(graph: ChannelGraph, consumer: str) -> _BatchNorm | None:
    """The BatchNorm that is the only user of ``consumer``'s output, if any (for running-mean folding)."""
    node = _node_of(graph, consumer)
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module":
        return None
    m = graph.gm.get_submodule(str(user.target))
    if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None:
        return graph.model.get_submodule(str(user.target))  # type: ignore[return-value]
    return None


def fold_constant_channels(graph: ChannelGraph, group: Group, channels: np.ndarray) -> None:
    """Fold the constant outputs of ``channels`` (γ == 0) of ``group`` into its consumers, in place on
    ``graph.model``, then set those channels' β to 0 so that they output exactly zero.

    Consumer kinds: ``nn.Conv2d`` (groups == 1, weight (out, in, kh, kw)) and ``nn.Linear`` (weight (out, in),
    ``stride`` inputs per channel when it reads a flattened map). Δ goes into the following BatchNorm's
    running mean when the consumer has no bias and feeds a BatchNorm, else into the consumer's bias (created
    when absent). See the module docstring for the border effect.
    """
    bn = bn_member(graph, group)
    if bn is None:
        raise PruneError(f"group '{group.id}' has no affine BatchNorm")
    bn_module = graph.model.get_submodule(bn.module)
    assert isinstance(bn_module, _BatchNorm)
    idx = [channel_slice(bn, int(i)).start for i in channels]
    gamma = bn_module.weight.detach()
    if not bool((gamma[idx] == 0).all()):
        raise PruneError(f"group '{group.id}': only channels with γ == 0 exactly can be folded")
    constants = channel_constants(graph, group, bn)
    for member in group.members:
        if member.role != "in":
            continue
        consumer = graph.model.get_submodule(member.module)
        const = constants[member.module]
        weight = consumer.weight.detach()
        if isinstance(consumer, nn.Conv2d) and consumer.groups == 1:
            delta = torch.zeros(weight.shape[0], dtype=weight.dtype)
            for i, j in zip(channels, idx):
                # Σ over the kernel's spatial taps of the input slice; the constant is c_j on all positions.
                delta += const[j] * weight[:, channel_slice(member, int(i))].sum(dim=(1, 2, 3))
        elif isinstance(consumer, nn.Linear):
            delta = torch.zeros(weight.shape[0], dtype=weight.dtype)
            for i, j in zip(channels, idx):
                delta += const[j] * weight[:, channel_slice(member, int(i))].sum(dim=1)
        else:
            raise PruneError(f"cannot fold a constant into '{member.module}' ({type(consumer).__name__})")
        following = _following_bn(graph, member.module)
        with torch.no_grad():
            if following is not None and getattr(consumer, "bias", None) is None:
                following.running_mean.sub_(delta.to(following.running_mean.dtype))
            elif consumer.bias is not None:
                consumer.bias.add_(delta)
            else:
                consumer.bias = nn.Parameter(delta.clone())
    with torch.no_grad():
        bn_module.bias[idx] = 0.0


@dataclass
class ConstantRemoval:
    """What :func:`remove_constant_channels` did.

    ``removals``: group id -> removed channel indices (sorted). ``constant``: the part of those that had γ == 0
    (folded). ``recursive``: the part removed because all their consumers' remaining weights were zero.
    ``skipped``: group id -> why zero-γ channels there were kept (residual sum, all channels zero, ...).
    """

    removals: dict[str, list[int]] = field(default_factory=dict)
    constant: dict[str, list[int]] = field(default_factory=dict)
    recursive: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _out_removals(graph: ChannelGraph, removals: Mapping[str, set[int]], module: str) -> set[int]:
    """Indices along dim 0 of ``module.weight`` that ``removals`` deletes (its producer groups' channels)."""
    out: set[int] = set()
    for gid, chans in removals.items():
        for m in graph.group(gid).members:
            if m.module == module and m.role == "out" and m.param == "weight":
                for i in chans:
                    s = channel_slice(m, i)
                    out.update(range(s.start, s.stop))
    return out


def _dead_channels(graph: ChannelGraph, group: Group, removals: Mapping[str, set[int]]) -> list[int]:
    """Channels of ``group`` whose every consumer weight slice is zero on the consumer's surviving outputs."""
    consumers = [m for m in group.members if m.role == "in"]
    if not consumers or any(m.role not in ("in", "out", "norm") for m in group.members):
        return []
    dead = []
    for i in range(group.size):
        alive = False
        for m in consumers:
            w = graph.model.get_submodule(m.module).weight.detach()
            gone = _out_removals(graph, removals, m.module)
            rows = [r for r in range(w.shape[0]) if r not in gone]
            if bool((w[rows][:, channel_slice(m, i)] != 0).any()):
                alive = True
                break
        if not alive:
            dead.append(i)
    return dead


def remove_constant_channels(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    recursive: bool = True,
    verify: bool = True,
) -> tuple[nn.Module, ConstantRemoval]:
    """Remove every channel whose BatchNorm γ is exactly 0, folding its constant output into its consumers.

    ``model`` is not modified: a deep copy is folded, traced and pruned through the engine (``verify`` checks
    the pruned model against the folded one, which is exact because folded channels output exactly zero).
    Residual-sum channels are never removed (the official code builds them without γ; methods.md §2.4).
    With ``recursive`` (the official flow-graph prune), a channel whose consumers' weights on it are all zero
    once the removed filters are gone is removed too, repeatedly until nothing changes; that removal is exact.
    At least one channel of every group is kept. See the module docstring for the border effect.
    Returns (pruned model, :class:`ConstantRemoval`).
    """
    import copy

    from pare.graph import trace

    work = copy.deepcopy(model)
    graph = trace(work, example_inputs)
    report = ConstantRemoval()
    removals: dict[str, set[int]] = {}
    candidates = {g.id for g, _ in penalised_groups(graph)}
    for g in graph.prunable_groups:
        bn = bn_member(graph, g)
        if bn is None:
            continue
        gamma = graph.model.get_submodule(bn.module).weight.detach()
        zero = [i for i in range(g.size) if float(gamma[channel_slice(bn, i).start]) == 0.0]
        if not zero:
            continue
        if g.id not in candidates:
            report.skipped[g.id] = "residual-sum channels are never removed" if is_residual_group(g) \
                else "not a single-producer conv + BatchNorm group"
            continue
        if len(zero) == g.size:
            zero = zero[1:]  # cannot remove all channels of a group: one constant channel stays
            report.skipped[g.id] = "all channels have γ == 0; one is kept"
        try:
            fold_constant_channels(graph, g, np.asarray(zero, dtype=np.int64))
        except PruneError as err:
            report.skipped[g.id] = str(err)
            continue
        removals[g.id] = set(zero)
        report.constant[g.id] = sorted(zero)
    changed = recursive
    while changed:
        changed = False
        for g, _ in penalised_groups(graph):
            have = removals.get(g.id, set())
            extra = [i for i in _dead_channels(graph, g, removals) if i not in have]
            extra = extra[: max(0, g.size - 1 - len(have))]
            if extra:
                removals.setdefault(g.id, set()).update(extra)
                report.recursive.setdefault(g.id, []).extend(extra)
                changed = True
    report.removals = {gid: sorted(v) for gid, v in removals.items() if v}
    if not report.removals:
        return work, report
    # Re-trace: folding may have created consumer biases that the first trace did not list.
    pruned = trace(work, example_inputs).prune(report.removals, verify=verify)
    return pruned, report


def interior_difference(a: torch.Tensor, b: torch.Tensor, margin: int) -> tuple[float, float]:
    """(max |a − b| over interior pixels, max |a − b| over all pixels) of feature maps (N, C, H, W).

    ``margin`` pixels are excluded on each side for the interior value: the border that zero-padding affects
    after folding (one pixel per padded 3×3 layer from the folded consumer on).
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"need two (N, C, H, W) maps of the same shape, got {tuple(a.shape)}, {tuple(b.shape)}")
    diff = (a.detach() - b.detach()).abs()
    h, w = a.shape[2], a.shape[3]
    inner = diff[:, :, margin:h - margin, margin:w - margin]
    return float(inner.max()) if inner.numel() else 0.0, float(diff.max())
