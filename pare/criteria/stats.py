"""Streaming activation statistics for data-driven criteria.

One fixed calibration set (``ScoreContext.data``) is run through :meth:`ChannelGraph.capture` once per batch, and
each criterion folds the captured maps into its own per-group accumulators. Only one batch of the requested
feature maps is alive at a time; nothing keeps all maps of all layers (CHIP's official code stores them all on
disk, which is what made its scoring slow and memory-hungry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from pare.errors import ConfigError
from pare.graph import ChannelGraph, Group

from .base import ScoreContext


@dataclass(frozen=True)
class Site:
    """Where a group's channels can be observed: ``node``'s output, channels ``positions`` (shape (group.size,))."""

    node: fx.Node
    positions: np.ndarray


def feature_sites(graph: ChannelGraph, groups: Sequence[Group]) -> dict[str, Site]:
    """For each group, its feature node (post-activation map, see :meth:`ChannelGraph.feature_node`)."""
    sites: dict[str, Site] = {}
    for g in groups:
        node = graph.feature_node(g.id)
        sites[g.id] = Site(node, graph.positions(g.id, node))
    return sites


def producer_sites(graph: ChannelGraph, group: Group) -> list[Site]:
    """The output nodes of the group's producer modules (pre-norm maps), one site per producing module."""
    sites: list[Site] = []
    seen: set[str] = set()
    for m in group.producers():
        if m.module in seen:
            continue
        seen.add(m.module)
        node = next(n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == m.module)
        sites.append(Site(node, graph.positions(group.id, node)))
    return sites


def output_node(graph: ChannelGraph) -> fx.Node:
    """The node whose value the traced model returns (a single tensor, e.g. the logits)."""
    out = next(n for n in graph.gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        raise ConfigError("the model must return a single tensor (logits) for label-based criteria")
    return value


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    The capture module shares its submodules with the user's model, so switching it to eval would otherwise
    leave the user's model in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


def _input_like(images: torch.Tensor, graph: ChannelGraph) -> torch.Tensor:
    """Move the calibration images to the traced model's device and floating dtype."""
    ref = next((p for p in graph.gm.parameters() if p.is_floating_point()), None)
    if ref is None:
        return images
    return images.to(device=ref.device, dtype=ref.dtype if images.is_floating_point() else images.dtype)


def calibration_batches(ctx: ScoreContext, name: str) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
    """``ctx.data``, or a clear error naming the criterion that needs it."""
    if ctx.data is None or len(ctx.data) == 0:
        raise ConfigError(f"criterion '{name}' needs calibration data (ScoreContext.data is empty)")
    return ctx.data


def stream_maps(
    ctx: ScoreContext,
    nodes: Sequence[fx.Node],
    update: Callable[[str, torch.Tensor], None],
    name: str,
) -> int:
    """Run the calibration set once and call ``update(node.name, map)`` for each node and batch.

    ``map``: the node's output for one batch, shape (N, C, ...), without gradient, in eval mode. Returns the
    number of images seen.
    """
    batches = calibration_batches(ctx, name)
    unique = list(dict.fromkeys(nodes))
    capture = ctx.graph.capture(unique)
    seen = 0
    with eval_mode(capture), torch.no_grad():
        for images, _labels in batches:
            out = capture(_input_like(images, ctx.graph))
            for node in unique:
                update(node.name, out[node.name])
            seen += int(images.shape[0])
    return seen


def stream_maps_with_grad(
    ctx: ScoreContext,
    nodes: Sequence[fx.Node],
    update: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None],
    name: str,
) -> int:
    """Like :func:`stream_maps`, with the gradient of the mean cross-entropy loss w.r.t. each captured map.

    ``update(maps, grads)`` gets, per batch, ``{node.name: (N, C, ...)}`` activations and their gradients
    (both detached). The loss is the cross-entropy of the model output against the batch labels; the model's
    parameter gradients are not touched (``torch.autograd.grad`` w.r.t. the maps only). Eval mode, so BN uses
    its running statistics and the scores see the network that will be pruned.
    """
    batches = calibration_batches(ctx, name)
    unique = list(dict.fromkeys(nodes))
    out_node = output_node(ctx.graph)
    capture = ctx.graph.capture([*unique, out_node])
    seen = 0
    with eval_mode(capture), torch.enable_grad():
        for images, labels in batches:
            # An input that requires grad keeps the maps in the autograd graph even when every parameter is
            # frozen (requires_grad=False).
            x = _input_like(images, ctx.graph).detach().requires_grad_(True)
            out = capture(x)
            logits = out[out_node.name]
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device))
            maps = [out[n.name] for n in unique]
            grads = torch.autograd.grad(loss, maps, allow_unused=True)
            update(
                {n.name: m.detach() for n, m in zip(unique, maps)},
                {n.name: (torch.zeros_like(m) if gr is None else gr.detach()) for n, m, gr in zip(unique, maps, grads)},
            )
            seen += int(images.shape[0])
    return seen
