"""Repair of a pruned model on calibration data: BatchNorm recalibration, then least-squares compensation.

One function, :func:`repair`, whatever pruned the model: pare's own surgery passes its channel graph and
removals; for a model pruned elsewhere (Torch-Pruning, a user's own code) the removals are inferred by
comparing the two models (:func:`pare.foreign.infer_removals`). Source: this project's design (issue #14);
the order recalibrate -> compensate and the sequential solve are measured in docs/results/oneshot.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pare.compensate import compensate
from pare.config import RepairConfig
from pare.errors import ConfigError
from pare.evaluate import recalibrate_bn
from pare.graph import ChannelGraph

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class RepairReport:
    """What :func:`repair` did: ``seconds`` per step ("recalibrate", "compensate") and, when compensation ran,
    per refitted layer ``{"before", "after", "applied"}`` relative squared errors (``compensation``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    compensation: dict[str, dict[str, float]] = field(default_factory=dict)


def repair(
    original: nn.Module,
    pruned: nn.Module,
    data: Sequence[Batch],
    config: RepairConfig,
    *,
    graph: ChannelGraph | None = None,
    removals: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> RepairReport:
    """Repair ``pruned`` in place on the calibration batches ``data`` (images (N, C, H, W), labels (N,)).

    ``original``: the model before pruning (only read). ``graph``/``removals``: the trace of ``original`` and
    the removed channel indices per group, as pare's surgery made them; when absent (a model pruned
    elsewhere) and compensation is asked for, they are inferred with :func:`pare.foreign.infer_removals`.
    Recalibration runs first (on the first ``config.recalibrate_batches`` batches, all when None), so that the
    least-squares fit sees the inputs of the recalibrated model; no second recalibration, because the
    sequential solve restores each refitted layer's original BN statistics (docs/results/oneshot.md).

    Raises:
        ConfigError: a repair without data.
    """
    report = RepairReport()
    if not config.active:
        return report
    batches = list(data)
    if not batches:
        raise ConfigError("repair (BN recalibration / compensation) needs calibration data")
    if config.compensate and (graph is None or removals is None):
        # Before recalibration changes the running statistics the matching compares.
        from pare.foreign import infer_removals  # the inference is only needed for foreign models

        graph, removals = infer_removals(original, pruned, batches[0][0][:1])
    if config.recalibrate:
        t0 = time.perf_counter()
        n = len(batches) if config.recalibrate_batches is None else config.recalibrate_batches
        recalibrate_bn(pruned, batches, batches=n)
        report.seconds["recalibrate"] = time.perf_counter() - t0
    if config.compensate:
        t0 = time.perf_counter()
        report.compensation = compensate(original, pruned, graph, removals, batches, seed=seed,
                                         method=config.compensate_method)
        report.seconds["compensate"] = time.perf_counter() - t0
    return report
