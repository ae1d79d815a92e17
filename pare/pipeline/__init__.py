"""``pare.pipeline.run``: the one orchestration path of pare.

load or build the model -> prune (one shot, or in ``prune.steps`` steps with repair and a recovery callback
between) -> repair (BN recalibration, least-squares compensation) -> fine-tune (recipe, optional distillation)
-> evaluate on named splits -> a JSON-ready record that carries its own configuration. The CLI (``pare prune``,
``pare demo``, ``pare run --config``), the benchmarks and the docs' examples call :func:`run`; a benchmark
differs from a CLI run only in its :class:`~pare.config.PipelineConfig`, which it records, so ``pare run
--config row.json`` replays any recorded row. Source: this project's design (issue #14).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from pare.allocate.budget import Budget
from pare.checks import check_given_input_size
from pare.config import FinetuneConfig, PipelineConfig, default_allocation, default_criterion
from pare.count import count
from pare.criteria.base import get_criterion
from pare.data import Normalization
from pare.errors import ConfigError
from pare.models import get_entry
from pare.pipeline.stages import (
    JSONDict,
    LoadedModel,
    Splits,
    evaluate_splits,
    is_artifact,
    load_data,
    load_model,
    resolve_normalization,
    train_dense,
    train_loaders,
)
from pare.prune import PruneResult, prune
from pare.prune_latency import prune_to_latency
from pare.repair import repair
from pare.train import fit

__all__ = ["PipelineResult", "Recover", "prepare", "resolve_defaults", "run", "step_targets", "with_seed"]

# Called between the steps of iterative pruning with the current pruned model (modified in place) and the
# 0-based index of the step just done; e.g. a short fine-tune.
Recover = Callable[[nn.Module, int], None]


@dataclass
class PipelineResult:
    """What :func:`run` did. ``model``: the final (pruned, repaired, fine-tuned) model; ``dense``: the model
    before pruning; ``prune``: the :class:`~pare.prune.PruneResult` of each step; ``accuracy``: stage
    ("dense", "pruned", "finetuned") -> split -> ``{"top1", "top5", "loss", "n"}`` (fractions); ``finetune``:
    the fine-tuning record (fractions) or None; ``seconds``: wall time per stage."""

    config: PipelineConfig
    model: nn.Module
    dense: nn.Module
    prune: list[PruneResult]
    input_shape: list[int]
    counts_before: JSONDict
    counts_after: JSONDict
    reduction: JSONDict
    accuracy: dict[str, dict[str, JSONDict]] = field(default_factory=dict)
    finetune: JSONDict | None = None
    dense_training: JSONDict | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def top1(self, stage: str, split: str = "test") -> float:
        """Top-1 fraction of ``stage`` on ``split`` (KeyError when it was not evaluated)."""
        return float(self.accuracy[stage][split]["top1"])  # type: ignore[arg-type]

    def record(self) -> JSONDict:
        """JSON-ready record: the configuration (replayable with ``pare run --config``) and every figure."""
        last = self.prune[-1]
        return {
            "config": self.config.to_dict(),
            "criterion": last.criterion,
            "budget": (f"latency_reduction={self.config.latency.reduction}" if self.config.latency is not None
                       else self.config.target.describe()),
            "input_shape": self.input_shape,
            "allocation": last.allocation,
            "residual_mode": last.residual_mode,
            "counts_before": self.counts_before,
            "counts_after": self.counts_after,
            "reduction": self.reduction,
            "removed_channels": sum(len(v) for r in self.prune for v in r.removals.values()),
            "steps": [r.summary() for r in self.prune],
            "latency_search": self.prune[-1].latency,
            "notes": [n for r in self.prune for n in r.notes],
            "accuracy": self.accuracy,
            "finetune": self.finetune,
            "dense_training": self.dense_training,
            "seconds": self.seconds,
        }


def step_targets(target: Budget, steps: int) -> list[Budget]:
    """Per-step budgets, each relative to the model the step starts from, so that after step k the model has
    lost ``k / steps`` of the total reduction ``t`` of the original: ``r_k = 1 - (1 - t k/N) / (1 - t (k-1)/N)``.
    One step returns ``[target]``; sparsity strings are one step by definition."""
    if steps == 1 or target.kind == "sparsity":
        return [target]
    t = float(target.value)
    out = []
    for k in range(1, steps + 1):
        r = 1.0 - (1.0 - t * k / steps) / (1.0 - t * (k - 1) / steps)
        out.append(Budget(**{target.kind: r}))
    return out


def resolve_defaults(config: PipelineConfig) -> PipelineConfig:
    """``config`` with every "auto" made explicit (criterion, allocation, repair): the validation-chosen default
    pipeline (:data:`pare.config.DEFAULT_PIPELINE`) when the run has data to calibrate on, the data-free defaults
    otherwise. The result is what a record stores, so a replay does not depend on the defaults of the day."""
    has_data = config.data.path is not None
    criterion = default_criterion(has_data) if config.criterion == "auto" else config.criterion
    allocation = default_allocation(has_data) if config.prune.allocation == "auto" else config.prune.allocation
    return replace(config, criterion=criterion, prune=replace(config.prune, allocation=allocation),
                   repair=config.repair.resolved(has_data))


def prepare(config: PipelineConfig, *, progress: bool = False, device: str = "cpu") -> tuple[LoadedModel, Splits]:
    """Load (and, with ``model.train``, train) the dense model and the data of ``config``: what :func:`run`
    does first. A caller that runs several configurations over the same model and data calls this once and
    passes ``model=`` and ``data=`` to :func:`run`."""
    # An artifact records its own normalization, which the data need; a zoo model needs the data's class count.
    config = resolve_defaults(config)
    loaded = load_model(config.model) if is_artifact(config.model.name) else None
    recorded = loaded.provenance.get("normalization") if loaded is not None else None
    # Without data nothing is normalised, so an artifact that records no normalization is no error then.
    norm = (resolve_normalization(config.data, config.model, recorded)  # type: ignore[arg-type]
            if config.data.path is not None else Normalization.preset("none"))
    calibrate = config.repair.active or get_criterion(config.criterion, **dict(config.criterion_options)).needs_data
    train = config.finetune is not None or config.recovery is not None or config.model.train is not None
    data = load_data(config.data, norm, need_train=train, calibrate=calibrate, splits=tuple(config.eval.splits))
    if loaded is None:
        loaded = load_model(config.model, data.classes)
    if config.model.train is not None:
        train_dense(loaded, config.model.train, data, device=device, progress=progress)
    return loaded, data


def _example_inputs(loaded: LoadedModel, data: Splits, config: PipelineConfig) -> torch.Tensor:
    """Seeded random images (1, C, H, W) for tracing and counting (the values do not matter)."""
    if config.model.input_size is not None:  # a user's size: checked against the data and the model first
        check_given_input_size(config.model.input_size, loaded.model, data.input_size)
    shape = config.model.input_size or data.input_size or loaded.recorded_input_shape
    if shape is None and not is_artifact(config.model.name):
        shape = get_entry(config.model.name).preprocessing.input_size
    if shape is None:
        raise ConfigError("cannot tell the input size: set model.input_size (--input-size CxHxW, e.g. 3x32x32) or "
                          "data.path (--data)")
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))


def _prune_step(model: nn.Module, example: torch.Tensor, target: Budget, config: PipelineConfig,
                calib: list[tuple[torch.Tensor, torch.Tensor]] | None) -> PruneResult:
    """One pruning step with the configured engine, then the repair."""
    criterion = get_criterion(config.criterion, **dict(config.criterion_options))
    if config.latency is not None:
        lat = config.latency
        return prune_to_latency(model, example, reduction=lat.reduction, criterion=criterion, data=calib,
                                config=config.prune, repair=config.repair, threads=lat.threads,
                                runs=max(lat.runs, 10))
    if config.prune.engine == "pare":
        return prune(model, example, criterion=criterion, target=target, data=calib, config=config.prune,
                     repair=config.repair)
    # Torch-Pruning: an optional dependency, imported only on this branch.
    from pare.baselines.torch_pruning import prune_with_torch_pruning

    p = config.prune
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    counts_before = count(model, example, p.convention)
    pruned = prune_with_torch_pruning(model, example, criterion=config.criterion, target=target,
                                      round_to=p.round_to, allocation=p.allocation,
                                      internal_only=p.internal_only is not False, data=calib, seed=p.seed,
                                      tolerance=p.tolerance, convention=p.convention)
    seconds["surgery"] = time.perf_counter() - t0
    done = repair(model, pruned, calib or [], config.repair, seed=p.seed)
    seconds.update(done.seconds)
    counts_after = count(pruned, example, p.convention)
    return PruneResult(model=pruned, removals={}, counts_before=counts_before, counts_after=counts_after,
                       reduction=counts_after.reduction_vs(counts_before), seconds=seconds,
                       criterion=f"torch-pruning:{config.criterion}", budget=target, allocation=p.allocation,
                       residual_mode="grouped" if p.internal_only is False else "internal", groups=[],
                       compensation=done.compensation)


def _finetune(model: nn.Module, dense: nn.Module, ft: FinetuneConfig, data: Splits, device: str,
              out_dir: Path | None, resume: bool, progress: bool) -> JSONDict:
    """Fine-tune ``model`` in place on the training images (the dense model as teacher with ``ft.distill``)."""
    teacher = copy.deepcopy(dense).eval() if ft.distill else None
    train_loader, val_loader = train_loaders(ft.recipe, data, ft.augment)
    outcome = fit(model, train_loader, val_loader, ft.recipe, teacher=teacher, device=device, out_dir=out_dir,
                  resume=resume, keep_best=ft.keep_best, progress=progress)
    model.to("cpu")
    return {
        "recipe": ft.recipe.to_dict(), "epochs_completed": outcome.epochs_completed,
        "train_images": len(data.train) if data.train is not None else None,
        "val_images": len(data.val) if data.val is not None else None,
        "final_val_top1": outcome.final_val_acc, "best_val_top1": outcome.best_val_acc,
        "best_val_epoch": outcome.best_val_epoch,
        "resumed_from": list(outcome.resumed_from) if outcome.resumed_from else None,
        "seconds": outcome.seconds,
    }


def run(
    config: PipelineConfig,
    *,
    model: LoadedModel | None = None,
    data: Splits | None = None,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    resume: bool = False,
    recover: Recover | None = None,
    progress: bool = False,
) -> PipelineResult:
    """Run the pipeline of ``config`` and return every figure with the configuration that produced it.

    Args:
        config: the whole run (:class:`~pare.config.PipelineConfig`).
        model, data: the dense model and the data from :func:`prepare` (loaded here when None). The dense
            model is never modified.
        device: where evaluation and fine-tuning run ("cpu", "cuda", "cuda:N"); pruning and repair run on CPU.
        out_dir: fine-tuning checkpoint and metrics.jsonl go to ``out_dir/finetune`` (None: not written).
        resume: continue an interrupted fine-tune from that checkpoint.
        recover: called between the steps of iterative pruning (``config.prune.steps`` > 1), after the
            configured ``recovery`` fine-tune if any; for what a configuration cannot say (it is not recorded).
        progress: progress bars for training.

    Raises:
        ConfigError, BudgetError, DataError, CheckpointError: bad configuration or inputs, one line each.
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    config = resolve_defaults(config)
    if model is None or data is None:
        t0 = time.perf_counter()
        loaded, splits = prepare(config, progress=progress, device=device)
        model, data = model or loaded, data or splits
        seconds["load"] = time.perf_counter() - t0
    dense = model.model
    example = _example_inputs(model, data, config)
    accuracy: dict[str, dict[str, JSONDict]] = {}
    if config.eval.dense and config.eval.splits:
        accuracy["dense"] = evaluate_splits(dense, data, config.eval, device)

    t0 = time.perf_counter()
    results: list[PruneResult] = []
    current = dense
    targets = step_targets(config.target, config.prune.steps)
    for index, target in enumerate(targets):
        result = _prune_step(current, example, target, config, data.calib)
        results.append(result)
        current = result.model
        if index < len(targets) - 1:
            if config.recovery is not None:
                _finetune(current, dense, config.recovery, data, device, None, False, progress)
            if recover is not None:
                recover(current, index)
    seconds["prune"] = time.perf_counter() - t0
    pruned = current
    if config.eval.splits:
        accuracy["pruned"] = evaluate_splits(pruned, data, config.eval, device)

    finetune_record = None
    if config.finetune is not None:
        t0 = time.perf_counter()
        finetune_record = _finetune(pruned, dense, config.finetune, data, device,
                                    Path(out_dir) / "finetune" if out_dir is not None else None, resume, progress)
        seconds["finetune"] = time.perf_counter() - t0
        if config.eval.splits:
            accuracy["finetuned"] = evaluate_splits(pruned, data, config.eval, device)

    first, last = results[0], results[-1]
    counts_after = count(pruned, example, config.prune.convention) if len(results) > 1 else last.counts_after
    seconds["total"] = time.perf_counter() - t_start
    return PipelineResult(
        config=config, model=pruned, dense=dense, prune=results, input_shape=list(example.shape[1:]),
        counts_before=first.counts_before.to_dict(), counts_after=counts_after.to_dict(),
        reduction=counts_after.reduction_vs(first.counts_before), accuracy=accuracy,
        finetune=finetune_record, dense_training=model.train_record, seconds=seconds,
    )


def with_seed(config: PipelineConfig, seed: int) -> PipelineConfig:
    """``config`` with every seed (data split and calibration, criterion, fine-tuning, initialisation) = ``seed``."""
    finetune = config.finetune
    if finetune is not None:
        finetune = replace(finetune, recipe=finetune.recipe.replace(seed=seed))
    model = replace(config.model, init_seed=seed,
                    train=config.model.train.replace(seed=seed) if config.model.train is not None else None)
    return replace(config, model=model, data=replace(config.data, seed=seed),
                   prune=replace(config.prune, seed=seed), finetune=finetune)

