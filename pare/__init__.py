"""pare: structural channel pruning for convolutional networks."""

from __future__ import annotations

__version__ = "0.1.0"

from pare.errors import (  # noqa: I001
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    EquivalenceError,
    PareError,
    PruneError,
    TraceError,
)

from pare.graph import ChannelGraph, Group, Member, trace

__all__ = [
    "BudgetError",
    "ChannelGraph",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EquivalenceError",
    "Group",
    "Member",
    "PareError",
    "PruneError",
    "TraceError",
    "__version__",
    "trace",
]
