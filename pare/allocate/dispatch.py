"""The allocation table: name -> function giving the order in which channels are removed.

An allocation sees groups and costs only: it turns the eligible groups and their criterion scores into an
*event order* (one group id per removed channel, first removed first); :func:`pare.allocate.search.search_order`
then finds the prefix that meets a MACs/params budget. Adding an allocation is one entry in :data:`ALLOCATORS`.
Source: this project's design (issue #14).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pare.allocate.strategies import global_order, uniform_order
from pare.errors import ConfigError
from pare.graph import ChannelGraph, Group


@dataclass(frozen=True)
class AllocationRequest:
    """What an allocation may look at: the eligible ``groups`` (graph order), the criterion's ``scores``
    (group id -> float64 array of the group's size, higher = keep) and the ``normalize`` rule of a global
    ranking (:func:`pare.allocate.strategies.normalize_scores`). A measured allocation (e.g. by sensitivity)
    also gets the traced ``graph`` of the ``model``, the ``example_inputs``, the calibration ``data``
    (``(images (N, C, H, W), labels (N,))`` batches; None without data) and the removal counts each group
    allows (``allowed``, ascending, starting with 0); None where the caller has none."""

    groups: Sequence[Group]
    scores: Mapping[str, np.ndarray]
    normalize: str = "mean"
    graph: ChannelGraph | None = None
    model: nn.Module | None = None
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    data: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
    allowed: Mapping[str, Sequence[int]] | None = None
    # The criterion's choice of the n channels a group loses (measured allocations mask exactly those), the
    # budget's reduction of a plan {group id: n removed} (a fraction), and the seed of any sampling.
    select: Callable[[Group, int], np.ndarray] | None = None
    reduction: Callable[[Mapping[str, int]], float] | None = None
    seed: int = 0


Allocator = Callable[[AllocationRequest], list[str]]


def _global(request: AllocationRequest) -> list[str]:
    return global_order(request.groups, request.scores, request.normalize)


def _uniform(request: AllocationRequest) -> list[str]:
    return uniform_order(request.groups)


def _sensitivity(request: AllocationRequest) -> list[str]:
    from pare.allocate.sensitivity import sensitivity_allocation

    return sensitivity_allocation(request)


ALLOCATORS: dict[str, Allocator] = {
    "global": _global,  # every channel ranked by its group-normalised score
    "uniform": _uniform,  # the same fraction of every group
    "sensitivity": _sensitivity,  # measured loss increase per unit of budget (pare.allocate.sensitivity)
}
ALLOCATIONS = tuple(ALLOCATORS)


def allocation_order(name: str, request: AllocationRequest) -> list[str]:
    """The event order of allocation ``name``; ConfigError for an unknown name."""
    if name not in ALLOCATORS:
        raise ConfigError(f"unknown allocation '{name}'; choose from {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name](request)
