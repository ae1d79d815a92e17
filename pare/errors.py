"""Exception types. Every error pare raises on bad input derives from :class:`PareError`.

The CLI turns any ``PareError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class PareError(Exception):
    """Base class of pare's user-facing errors (bad input, impossible request)."""


class TraceError(PareError):
    """The model could not be traced into a channel graph."""


class PruneError(PareError):
    """A removal request is invalid (unknown group, frozen group, bad indices, ...)."""


class EquivalenceError(PareError):
    """The pruned model does not compute what the masked original computes.

    ``node`` names the first graph node whose output diverged, ``max_abs_diff`` how far.
    """

    def __init__(self, message: str, node: str | None = None, max_abs_diff: float | None = None):
        super().__init__(message)
        self.node = node
        self.max_abs_diff = max_abs_diff


class DataError(PareError):
    """A data set file is missing, truncated or malformed."""


class CheckpointError(PareError):
    """A checkpoint or artifact cannot be read, is unsafe, or does not match the model."""


class BudgetError(PareError):
    """A pruning budget is malformed or cannot be met."""


class ConfigError(PareError):
    """A configuration value is invalid."""


class ExportError(PareError):
    """A model could not be exported (ONNX)."""


class TrainingDivergedError(PareError):
    """Training produced a non-finite loss."""


class DistributedError(PareError):
    """A distributed run failed: a collective timed out (a rank stopped, hung or died) or a peer went away."""
