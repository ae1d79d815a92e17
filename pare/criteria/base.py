"""The criterion interface and registry.

A criterion turns groups of coupled channels into per-channel importance scores (higher = keep), or, for
clustering methods, overrides :meth:`Criterion.select` to pick the channels to remove directly. Adding one is a
short file with a subclass plus ``@register_criterion`` (see docs/criteria/adding.md).
"""

from __future__ import annotations

import difflib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from pare.errors import ConfigError
from pare.graph import ChannelGraph, Group

Batch = tuple[torch.Tensor, torch.Tensor]  # images (N, C, H, W) float, labels (N,) int64


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may look at.

    ``data``: calibration batches (fixed, seeded, not augmented), or None for data-free criteria.
    ``aggregate``: how the scores of a group's members combine ("sum", "mean", "max", "first": only the first
    producer), for coupled groups such as residual sums and concatenations.
    """

    graph: ChannelGraph
    model: nn.Module
    data: Sequence[Batch] | None = None
    aggregate: str = "sum"
    seed: int = 0


AGGREGATES = ("sum", "mean", "max", "first")


def aggregate(per_member: Sequence[np.ndarray], how: str) -> np.ndarray:
    """Combine per-member score arrays, each of shape (group.size,), into one (group.size,) array."""
    if how not in AGGREGATES:
        raise ConfigError(f"unknown aggregation '{how}'; choose from {', '.join(AGGREGATES)}")
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in per_member])
    if how == "sum":
        return stack.sum(0)
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.max(0)
    return stack[0]


class Criterion(ABC):
    """Base class. Subclasses set the class attributes and implement :meth:`score`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `pare criteria`
    evidence: ClassVar[str]  # e.g. "paper + official code", "reconstructed from the abstract"
    needs_data: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False

    @abstractmethod
    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        """Per group id, importance scores of shape (group.size,), float64; higher means keep."""

    def select(self, ctx: ScoreContext, group: Group, scores: np.ndarray, n_remove: int) -> np.ndarray:
        """Indices (ascending) of the ``n_remove`` channels to remove: the lowest scores, in whole blocks."""
        if n_remove <= 0:
            return np.zeros(0, dtype=np.int64)
        if group.block > 1:
            block_scores = scores.reshape(-1, group.block).sum(1)
            n_blocks = n_remove // group.block
            chosen = np.argsort(block_scores, kind="stable")[:n_blocks]
            idx = (chosen[:, None] * group.block + np.arange(group.block)[None, :]).reshape(-1)
            return np.sort(idx).astype(np.int64)
        return np.sort(np.argsort(scores, kind="stable")[:n_remove]).astype(np.int64)


_REGISTRY: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a criterion available by its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ConfigError(f"criterion '{cls.name}' is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def criterion_options(cls: type[Criterion]) -> list[str]:
    """Keyword options the constructor of ``cls`` accepts (``--criterion-option`` keys)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def get_criterion(name: str | Criterion, **kwargs: Any) -> Criterion:
    """An instance of the registered criterion ``name`` (a Criterion instance is returned as is).

    Raises:
        ConfigError: unknown name, or an option the criterion does not take (the message lists the valid ones).
    """
    if isinstance(name, Criterion):
        return name
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown criterion '{name}'{hint}; available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    valid = criterion_options(cls)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(set(kwargs) - set(valid))
    if unknown and not takes_any:
        raise ConfigError(f"criterion '{name}' has no option {', '.join(unknown)}; valid options: "
                          f"{', '.join(valid) if valid else 'none'}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"criterion '{name}': invalid option value ({exc})") from None


def list_criteria() -> list[type[Criterion]]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
