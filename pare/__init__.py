"""pare: structural channel pruning for convolutional networks.

The pipeline, one module each: ``pare.trace`` (channel groups) -> ``pare.criteria`` (scores) -> ``pare.allocate``
(how many per group) -> ``ChannelGraph.prune`` (verified surgery) -> ``pare.repair`` (BN recalibration,
compensation) -> ``pare.train`` (fine-tuning) -> ``pare.io`` (artifacts, ONNX); ``pare.pipeline.run`` runs them
all from one :class:`pare.config.PipelineConfig`. The layering is drawn in docs/design.md.
"""

from __future__ import annotations

from pare.allocate.budget import Budget
from pare.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    PipelineConfig,
    PruneConfig,
    RepairConfig,
)
from pare.count import Counts, count
from pare.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    EquivalenceError,
    ExportError,
    PareError,
    PruneError,
    TraceError,
    TrainingDivergedError,
)
from pare.evaluate import evaluate, recalibrate_bn
from pare.graph import ChannelGraph, Group, Member, trace
from pare.io import export_onnx, load, load_checkpoint, read_metadata, save
from pare.latency import Latency, measure_latency
from pare.prune import PruneResult, prune
from pare.prune_latency import prune_to_latency
from pare.version import __version__

__all__ = [
    "Budget",
    "BudgetError",
    "ChannelGraph",
    "CheckpointError",
    "ConfigError",
    "Counts",
    "DataConfig",
    "DataError",
    "DistributedError",
    "EquivalenceError",
    "EvalConfig",
    "ExportError",
    "FinetuneConfig",
    "Group",
    "Latency",
    "Member",
    "ModelConfig",
    "PareError",
    "PipelineConfig",
    "PruneConfig",
    "PruneError",
    "PruneResult",
    "RepairConfig",
    "TraceError",
    "TrainingDivergedError",
    "__version__",
    "count",
    "evaluate",
    "export_onnx",
    "load",
    "load_checkpoint",
    "measure_latency",
    "prune",
    "prune_to_latency",
    "read_metadata",
    "recalibrate_bn",
    "save",
    "trace",
]
