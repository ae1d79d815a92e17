"""The fine-tuning loop: :func:`fit` (evaluation goes through :func:`pare.evaluate.evaluate`).

Design points (methods.md §7.3, §7.4):

* The LR is set every step from the pure function :func:`pare.train.recipe.lr_at`.
* Model selection uses the validation loader only. The test loader is evaluated once, after the last epoch;
  :class:`TrainResult` reports the final-epoch test accuracy (and, with ``keep_best``, the test accuracy of
  the best-on-validation weights), never a best-on-test number.
* ``out_dir/checkpoint.pt`` is rewritten atomically after every epoch (and every ``checkpoint_every_steps``
  steps) and holds everything needed to continue bit-exactly: model, optimizer, GradScaler, step counters,
  per-rank RNG states, running epoch sums, best-on-val weights and the metrics history. Data order depends
  only on (seed, epoch); a run resumed mid-epoch re-reads and discards the batches it had already trained on,
  then restores the RNG states.
* Evaluation runs on a private RNG stream, so evaluating (or not) never changes the training trajectory.
* Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel; see
  :mod:`pare.train.distributed` for launch commands and how data is sharded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pare.errors import CheckpointError, ConfigError, TrainingDivergedError
from pare.evaluate import evaluate
from pare.train.checkpoint import (
    CHECKPOINT_NAME,
    FORMAT_VERSION,
    RngFork,
    atomic_torch_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from pare.train.distributed import (
    DistContext,
    begin_epoch,
    prepare_eval_loader,
    prepare_train_loader,
    setup_distributed,
)
from pare.train.recipe import Recipe, lr_at

log = logging.getLogger("pare.train")

METRICS_NAME = "metrics.jsonl"



@dataclass
class TrainResult:
    """Outcome of :func:`fit`. Accuracies are fractions in [0, 1]; epochs are 0-based indices.

    ``test_acc`` is the accuracy of the *final-epoch* weights on the test loader (None without one).
    ``test_acc_best_val`` is the test accuracy of the best-on-validation weights, only with ``keep_best``.
    """

    recipe: Recipe
    epochs_completed: int
    final_train_loss: float
    final_train_acc: float
    final_val_loss: float
    final_val_acc: float
    best_val_acc: float
    best_val_epoch: int
    test_loss: float | None = None
    test_acc: float | None = None
    test_acc_best_val: float | None = None
    resumed_from: tuple[int, int] | None = None
    seconds: float = 0.0
    checkpoint_path: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _order_seed(seed: int, epoch: int) -> int:
    # Distinct, reproducible stream per (seed, epoch); masked to a non-negative int64 for manual_seed.
    return (seed * 1_000_003 + epoch * 7_919 + 0x5EED) & 0x7FFF_FFFF_FFFF_FFFF


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    elif isinstance(batch, dict) and "images" in batch and "labels" in batch:
        images, labels = batch["images"], batch["labels"]
    else:
        raise ConfigError(f"a batch must be (images, labels); got {type(batch).__name__}")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ConfigError("a batch must hold tensors (images, labels)")
    return images, labels


def _to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    # Soft/one-hot targets (N, C) count as correct when their argmax is predicted.
    targets = labels.argmax(dim=1) if labels.dim() == 2 else labels
    return int((logits.argmax(dim=1) == targets).sum().item())


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


def _evaluate(
    model: nn.Module, loader: Iterable[Any], device: torch.device, recipe: Recipe, sharded: bool
) -> dict[str, float]:
    """Validation/test metrics through :func:`pare.evaluate.evaluate`: ``{"loss", "acc"}`` with ``acc`` a
    fraction. ``sharded``: this rank holds a disjoint part of the data, so the sums are all-reduced."""
    out = evaluate(
        model,
        loader,
        device=device,
        topk=(1,),
        channels_last=recipe.channels_last,
        amp=recipe.amp,
        all_reduce=sharded,
    )
    return {"loss": float(out["loss"]), "acc": float(out["top1"])}


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with the recipe's momentum/nesterov/weight decay. With ``no_decay_bn_bias`` every parameter of dim
    <= 1 (BN/LayerNorm scales and shifts, biases) is put in a group with weight decay 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if recipe.no_decay_bn_bias:
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        groups: list[dict[str, Any]] = [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": params, "weight_decay": recipe.weight_decay}]
    return torch.optim.SGD(
        groups,
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )


def _task_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, recipe: Recipe
) -> torch.Tensor:
    """(1 − α)·CE(label-smoothed) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)); α = 0 without a
    teacher."""
    hard = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
    if teacher_logits is None or recipe.distill_alpha == 0.0:
        return hard
    temperature = recipe.distill_temperature
    soft = F.kl_div(
        F.log_softmax(logits.float() / temperature, dim=1),
        F.log_softmax(teacher_logits.float() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (
        temperature * temperature
    )  # T² keeps the soft-target gradient scale independent of T (Hinton et al.)
    return (1.0 - recipe.distill_alpha) * hard + recipe.distill_alpha * soft


def _show_progress(progress: bool | None, ctx: DistContext) -> bool:
    if not ctx.is_main or progress is False:
        return False
    if progress is True:
        return True
    return sys.stderr.isatty() and not os.environ.get("CI")


def _call_hooks(hooks: Sequence[Any], name: str, *args: Any) -> None:
    for hook in hooks:
        method = getattr(hook, name, None)
        if method is not None:
            method(*args)


def _epoch_batches(loader: Iterable[Any], order_seed: int, steps: int) -> Iterator[Any]:
    """The ``steps`` batches of one epoch.

    ``iter()`` and the first ``next()`` run on a torch RNG seeded with ``order_seed``: that is where
    DataLoader draws its sampler and worker seeds, so the order depends only on (seed, epoch), not on the
    training RNG history.
    """
    with RngFork(order_seed):
        iterator = iter(loader)
        first = next(iterator, None)
    if first is None:
        raise ConfigError("the train loader produced no batches")
    yield first
    for produced in range(1, steps):
        try:
            yield next(iterator)
        except StopIteration:
            raise ConfigError(
                f"the train loader produced {produced} batches but its len() is {steps}"
            ) from None


class _MetricsWriter:
    """Appends one JSON line per epoch to ``out_dir/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, out_dir: Path | None, enabled: bool):
        self.path = out_dir / METRICS_NAME if out_dir is not None and enabled else None

    def rewrite(self, history: list[dict[str, Any]]) -> None:
        # On resume the file is rebuilt from the checkpoint, so a crash between checkpoint and append loses
        # nothing.
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in history:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()


def _clean_stale_temp_files(out_dir: Path) -> None:
    # A SIGKILL during atomic_torch_save leaves its temp file behind; the real checkpoint is untouched.
    for stale in out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)


def fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    recipe: Recipe,
    *,
    test_loader: Iterable[Any] | None = None,
    teacher: nn.Module | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    device: str | torch.device = "cpu",
    hooks: Sequence[Any] = (),
    progress: bool | None = None,
    keep_best: bool = False,
    checkpoint_every_steps: int = 0,
    sync_bn: bool = False,
) -> TrainResult:
    """Train ``model`` in place with ``recipe``; return a :class:`TrainResult`.

    Loaders yield ``(images, labels)``: float images (N, C, H, W) and int64 labels (N,) (or soft targets (N,
    K)). ``len(train_loader)`` must be the number of batches per epoch (per rank). Loaders may expose
    ``set_epoch(epoch)`` (called before each epoch); see :mod:`pare.train.distributed` for sharding under DDP.

    ``hooks`` are objects with any of these optional methods, called on the unwrapped model:

    * ``on_epoch_start(model, epoch)``: at the start of each epoch (again when resuming inside that epoch);
    * ``on_epoch_end(model, epoch)``: after the epoch's last step, before validation and the epoch checkpoint
      (e.g. soft pruning re-zeroes filters here, :mod:`pare.methods.soft_prune`);
    * ``on_loss(model, loss, batch) -> loss``: add a regulariser (``batch`` = (images, labels) on the device);
    * ``after_backward(model)``: gradients are complete, all-reduced and unscaled (e.g. a BN-γ subgradient);
    * ``after_step(model, optimizer, lr)``: after the optimizer step (e.g. a proximal step at the current LR);
    * ``state_dict() / load_state_dict(state)``: stored in the checkpoint (tensors and primitives only).

    ``out_dir`` receives ``checkpoint.pt`` and ``metrics.jsonl``; with ``resume`` an existing checkpoint is
    continued exactly (it must come from the same recipe and world size). ``keep_best`` leaves the
    best-on-validation weights in ``model`` at the end (otherwise the final-epoch weights). ``teacher``
    enables distillation with ``recipe.distill_alpha``. AMP (float16 autocast + GradScaler) only acts on CUDA.
    ``sync_bn`` converts BatchNorm to SyncBatchNorm under DDP (CUDA only in torch); the converted model is
    what is trained.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe must be a pare.train.Recipe, got {type(recipe).__name__}")
    if not isinstance(checkpoint_every_steps, int) or checkpoint_every_steps < 0:
        raise ConfigError(f"checkpoint_every_steps must be an int >= 0, got {checkpoint_every_steps}")
    if teacher is not None and recipe.distill_alpha == 0.0:
        log.warning("a teacher was given but recipe.distill_alpha is 0: distillation is off")
    ctx = setup_distributed(device)
    try:
        return _fit(
            model,
            train_loader,
            val_loader,
            recipe,
            test_loader=test_loader,
            teacher=teacher,
            out_dir=Path(out_dir) if out_dir is not None else None,
            resume=resume,
            ctx=ctx,
            hooks=tuple(hooks),
            progress=progress,
            keep_best=keep_best,
            checkpoint_every_steps=checkpoint_every_steps,
            sync_bn=sync_bn,
        )
    finally:
        ctx.close()


def _state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _fit(
    model: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    recipe: Recipe,
    *,
    test_loader: Iterable[Any] | None,
    teacher: nn.Module | None,
    out_dir: Path | None,
    resume: bool,
    ctx: DistContext,
    hooks: tuple[Any, ...],
    progress: bool | None,
    keep_best: bool,
    checkpoint_every_steps: int,
    sync_bn: bool,
) -> TrainResult:
    started = time.perf_counter()
    dev = ctx.device
    if sync_bn and ctx.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(dev)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(dev).eval()
        if recipe.channels_last:
            teacher.to(memory_format=torch.channels_last)
    use_amp = recipe.amp and dev.type == "cuda"
    optimizer = build_optimizer(model, recipe)
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp)

    train_loader = prepare_train_loader(train_loader, ctx, recipe.seed)
    val_loader, val_sharded = prepare_eval_loader(val_loader, ctx)
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("the train loader must define __len__ (batches per epoch)") from None
    if steps_per_epoch < 1:
        raise ConfigError("the train loader is empty")
    if ctx.is_distributed:
        counts = ctx.all_gather_object(steps_per_epoch)
        if len(set(counts)) != 1:
            raise ConfigError(f"ranks disagree on batches per epoch: {counts}; shard the data evenly")

    # Per-rank streams (dropout, augmentation); data order uses its own (seed, epoch) stream.
    random.seed(recipe.seed + ctx.rank)
    np.random.seed((recipe.seed + ctx.rank) % 2**32)
    torch.manual_seed(recipe.seed + ctx.rank)

    start_epoch, start_step, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    best_val_acc, best_val_epoch = -math.inf, -1
    best_state: dict[str, torch.Tensor] | None = None
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0, "lr_first": 0.0}
    pending_rng: dict[str, Any] | None = None
    resumed_from: tuple[int, int] | None = None
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None

    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale_temp_files(out_dir)
    ctx.barrier()
    if ckpt_path is not None and resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("recipe") != recipe.to_dict():
            raise CheckpointError(
                f"{ckpt_path} was written with another recipe; use a new out_dir or resume=False"
            )
        if state.get("world_size") != ctx.world_size:
            raise CheckpointError(
                f"{ckpt_path} was written with world size {state.get('world_size')}, "
                f"this run has {ctx.world_size}"
            )
        if state.get("steps_per_epoch") != steps_per_epoch:
            raise CheckpointError(
                f"{ckpt_path} has {state.get('steps_per_epoch')} steps per epoch, "
                f"this loader {steps_per_epoch}"
            )
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{ckpt_path} does not match this model: {str(exc).splitlines()[0]}"
            ) from exc
        for hook, hook_state in zip(hooks, state.get("hooks", [])):
            if hook_state is not None and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(hook_state)
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        history = list(state["history"])
        best_val_acc, best_val_epoch = state["best_val_acc"], state["best_val_epoch"]
        best_state = state.get("best_state")
        sums = dict(state["epoch_sums"])
        pending_rng = state["rng"][ctx.rank]
        resumed_from = (start_epoch, start_step)
        if ctx.is_main:
            log.info("resuming from %s at epoch %d step %d", ckpt_path, start_epoch, start_step)

    metrics = _MetricsWriter(out_dir, ctx.is_main)
    if resumed_from is not None:
        metrics.rewrite(history)
    elif ckpt_path is not None and ctx.is_main:
        metrics.rewrite([])

    train_model: nn.Module = model
    if ctx.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    def save_checkpoint(epoch: int, step: int) -> None:
        """``epoch``/``step`` name the next step to run."""
        rng_all = ctx.all_gather_object(capture_rng_state())
        if ckpt_path is None or not ctx.is_main:
            return
        hook_states = [hook.state_dict() if hasattr(hook, "state_dict") else None for hook in hooks]
        atomic_torch_save(
            {
                "format": "pare.train",
                "version": FORMAT_VERSION,
                "recipe": recipe.to_dict(),
                "world_size": ctx.world_size,
                "steps_per_epoch": steps_per_epoch,
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "model": _state_dict_cpu(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_all,
                "hooks": hook_states,
                "history": history,
                "best_val_acc": best_val_acc,
                "best_val_epoch": best_val_epoch,
                "best_state": best_state,
                "epoch_sums": dict(sums),
            },
            ckpt_path,
        )

    show = _show_progress(progress, ctx)
    for epoch in range(start_epoch, recipe.epochs):
        skip = start_step if epoch == start_epoch else 0
        if pending_rng is not None and skip == 0:
            # Epoch-boundary resume: the saved state is the one the next epoch starts from.
            restore_rng_state(pending_rng)
            pending_rng = None
        if skip == 0:
            sums = {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0, "lr_first": 0.0}
        _call_hooks(hooks, "on_epoch_start", model, epoch)
        begin_epoch(train_loader, epoch, ctx)
        train_model.train()
        epoch_started = time.perf_counter()
        batches = _epoch_batches(train_loader, _order_seed(recipe.seed, epoch), steps_per_epoch)
        for _ in range(skip):
            next(batches)  # mid-epoch resume: re-read and drop what the interrupted run already trained on
        if pending_rng is not None:
            # Restored only now, so reading the skipped batches cannot shift the augmentation/dropout streams.
            restore_rng_state(pending_rng)
            pending_rng = None
        bar = tqdm(
            total=steps_per_epoch,
            initial=skip,
            disable=not show,
            leave=False,
            dynamic_ncols=True,
            desc=f"epoch {epoch + 1}/{recipe.epochs}",
        )
        lr = recipe.lr
        for step in range(skip, steps_per_epoch):
            batch = next(batches)
            lr = lr_at(recipe, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step == 0:
                sums["lr_first"] = lr
            images, labels = _to_device(*_split_batch(batch), dev, recipe.channels_last)
            teacher_logits = None
            if teacher is not None and recipe.distill_alpha > 0:
                with torch.no_grad(), _autocast(dev, use_amp):
                    teacher_logits = teacher(images)
            with _autocast(dev, use_amp):
                logits = train_model(images)
            task_loss = _task_loss(logits, labels, teacher_logits, recipe)
            loss = task_loss
            for hook in hooks:
                on_loss = getattr(hook, "on_loss", None)
                if on_loss is not None:
                    loss = on_loss(model, loss, (images, labels))
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDivergedError(
                    f"non-finite loss {loss.item()} at epoch {epoch} step {step}; lower the LR"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # hooks and clipping must see true gradients
            _call_hooks(hooks, "after_backward", model)
            if recipe.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            _call_hooks(hooks, "after_step", model, optimizer, lr)
            global_step += 1
            n = int(labels.shape[0])
            sums["loss"] += float(task_loss.detach().item()) * n
            sums["correct"] += _correct(logits.detach(), labels)
            sums["count"] += n
            bar.update(1)
            if show and step % 10 == 0:
                bar.set_postfix(loss=f"{task_loss.item():.4f}", lr=f"{lr:.2e}")
            if (
                checkpoint_every_steps
                and global_step % checkpoint_every_steps == 0
                and step + 1 < steps_per_epoch
            ):
                sums["seconds"] += time.perf_counter() - epoch_started
                epoch_started = time.perf_counter()
                save_checkpoint(epoch, step + 1)
        bar.close()
        # Before validation and the epoch checkpoint, so both see (and a resume restores) what the hook did.
        _call_hooks(hooks, "on_epoch_end", model, epoch)

        train_loss_sum, train_correct, train_count = ctx.all_reduce_sum(
            [sums["loss"], sums["correct"], sums["count"]]
        )
        with RngFork():
            val = _evaluate(model, val_loader, dev, recipe, val_sharded)
        if val["acc"] > best_val_acc:
            best_val_acc, best_val_epoch = val["acc"], epoch
            if keep_best:
                best_state = _state_dict_cpu(model)
        row = {
            "epoch": epoch,
            "lr": sums["lr_first"],
            "lr_end": lr,
            "train_loss": train_loss_sum / train_count,
            "train_acc": train_correct / train_count,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "seconds": sums["seconds"] + time.perf_counter() - epoch_started,
        }
        history.append(row)
        save_checkpoint(epoch + 1, 0)
        metrics.append(row)
        if ctx.is_main:
            log.info(
                "epoch %d/%d lr %.3g train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs",
                epoch + 1,
                recipe.epochs,
                row["lr"],
                row["train_loss"],
                row["train_acc"],
                row["val_loss"],
                row["val_acc"],
                row["seconds"],
            )

    if not history:
        raise CheckpointError("nothing was trained and the checkpoint holds no history")
    result = TrainResult(
        recipe=recipe,
        epochs_completed=len(history),
        final_train_loss=history[-1]["train_loss"],
        final_train_acc=history[-1]["train_acc"],
        final_val_loss=history[-1]["val_loss"],
        final_val_acc=history[-1]["val_acc"],
        best_val_acc=best_val_acc,
        best_val_epoch=best_val_epoch,
        resumed_from=resumed_from,
        checkpoint_path=ckpt_path,
        history=history,
    )
    if test_loader is not None:
        test_loader, test_sharded = prepare_eval_loader(test_loader, ctx)
        with RngFork():
            test = _evaluate(model, test_loader, dev, recipe, test_sharded)
        result.test_loss, result.test_acc = test["loss"], test["acc"]
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
        if test_loader is not None:
            with RngFork():
                result.test_acc_best_val = _evaluate(model, test_loader, dev, recipe, test_sharded)["acc"]
    result.seconds = time.perf_counter() - started
    return result
