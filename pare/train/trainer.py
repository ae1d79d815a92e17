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

import logging
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
from torch import nn
from tqdm.auto import tqdm

from pare.errors import CheckpointError, ConfigError
from pare.evaluate import evaluate
from pare.train.checkpoint import CHECKPOINT_NAME, RngFork, capture_rng_state, restore_rng_state
from pare.train.distributed import (
    DistContext,
    begin_epoch,
    distributed_error,
    prepare_eval_loader,
    prepare_train_loader,
    setup_distributed,
    sync_batchnorm_stats,
)
from pare.train.hooks import TrainHook, check_hooks
from pare.train.recipe import Recipe, lr_at
from pare.train.resume import (
    MetricsWriter,
    ResumeState,
    clean_stale_temp_files,
    fresh_sums,
    state_dict_cpu,
)
from pare.train.step import Loop, build_optimizer, train_step

log = logging.getLogger("pare.train")




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


def _show_progress(progress: bool | None, ctx: DistContext) -> bool:
    if not ctx.is_main or progress is False:
        return False
    if progress is True:
        return True
    return sys.stderr.isatty() and not os.environ.get("CI")


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
    checked = check_hooks(hooks)
    ctx = setup_distributed(device)
    # The run seeds the global Python/NumPy/torch streams from the recipe (dropout, augmentation); the fork gives
    # the caller its own states back afterwards, so fit() leaves no hidden state behind.
    try:
        with RngFork():
            return _fit(model, train_loader, val_loader, recipe, test_loader=test_loader, teacher=teacher,
                        out_dir=Path(out_dir) if out_dir is not None else None, resume=resume, ctx=ctx,
                        hooks=checked, progress=progress, keep_best=keep_best,
                        checkpoint_every_steps=checkpoint_every_steps, sync_bn=sync_bn)
    except RuntimeError as exc:  # a collective timed out or a peer vanished: one clear DistributedError
        raise distributed_error(exc, ctx, Path(out_dir) / CHECKPOINT_NAME if out_dir else None) from None
    finally:
        ctx.close()


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
    hooks: tuple[TrainHook, ...],
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

    # Per-rank streams (dropout, augmentation) seeded from the recipe; fit() restores the caller's RNG states
    # when it returns. Data order uses its own (seed, epoch) stream (_epoch_batches).
    random.seed(recipe.seed + ctx.rank)
    np.random.seed((recipe.seed + ctx.rank) % 2**32)
    torch.manual_seed(recipe.seed + ctx.rank)

    state = ResumeState()
    ckpt_path = out_dir / CHECKPOINT_NAME if out_dir is not None else None
    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(out_dir)
    ctx.barrier()
    if ckpt_path is not None and resume and ckpt_path.is_file():
        state = ResumeState.load(ckpt_path, recipe=recipe, world_size=ctx.world_size, rank=ctx.rank,
                                 steps_per_epoch=steps_per_epoch, model=model, optimizer=optimizer,
                                 scaler=scaler, hooks=hooks)
        if ctx.is_main:
            log.info("resuming from %s at epoch %d step %d", ckpt_path, state.epoch, state.step)

    metrics = MetricsWriter(out_dir, ctx.is_main)
    if state.resumed_from is not None:
        metrics.rewrite(state.history)
    elif ckpt_path is not None and ctx.is_main:
        metrics.rewrite([])

    train_model: nn.Module = model
    if ctx.is_distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    loop = Loop(model, train_model, teacher, recipe, optimizer, scaler, hooks, dev, use_amp)

    def save_checkpoint(epoch: int, step: int) -> None:
        """``epoch``/``step`` name the next step to run."""
        sync_batchnorm_stats(model, ctx)
        rng_all = ctx.all_gather_object(capture_rng_state())
        if ckpt_path is not None and ctx.is_main:
            state.save(ckpt_path, epoch=epoch, step=step, recipe=recipe, world_size=ctx.world_size,
                       steps_per_epoch=steps_per_epoch, model=model, optimizer=optimizer, scaler=scaler,
                       hooks=hooks, rng_all=rng_all)

    show = _show_progress(progress, ctx)
    start_epoch, start_step = state.epoch, state.step
    for epoch in range(start_epoch, recipe.epochs):
        skip = start_step if epoch == start_epoch else 0
        if state.rng is not None and skip == 0:
            # Epoch-boundary resume: the saved state is the one the next epoch starts from.
            restore_rng_state(state.rng)
            state.rng = None
        if skip == 0:
            state.sums = fresh_sums()
        sums = state.sums
        for hook in hooks:
            hook.on_epoch_start(model, epoch)
        begin_epoch(train_loader, epoch, ctx)
        train_model.train()
        epoch_started = time.perf_counter()
        batches = _epoch_batches(train_loader, _order_seed(recipe.seed, epoch), steps_per_epoch)
        for _ in range(skip):
            next(batches)  # mid-epoch resume: re-read and drop what the interrupted run already trained on
        if state.rng is not None:
            # Restored only now, so reading the skipped batches cannot shift the augmentation/dropout streams.
            restore_rng_state(state.rng)
            state.rng = None
        bar = tqdm(total=steps_per_epoch, initial=skip, disable=not show, leave=False, dynamic_ncols=True,
                   desc=f"epoch {epoch + 1}/{recipe.epochs}")
        lr = recipe.lr
        for step in range(skip, steps_per_epoch):
            batch = next(batches)
            lr = lr_at(recipe, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step == 0:
                sums["lr_first"] = lr
            loss = train_step(loop, batch, epoch, step, lr, sums)
            state.global_step += 1
            bar.update(1)
            if show and step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if checkpoint_every_steps and state.global_step % checkpoint_every_steps == 0 \
                    and step + 1 < steps_per_epoch:
                sums["seconds"] += time.perf_counter() - epoch_started
                epoch_started = time.perf_counter()
                save_checkpoint(epoch, step + 1)
        bar.close()
        # Before validation and the epoch checkpoint, so both see (and a resume restores) what the hook did.
        for hook in hooks:
            hook.on_epoch_end(model, epoch)
        train_loss_sum, train_correct, train_count = ctx.all_reduce_sum([sums["loss"], sums["correct"],
                                                                         sums["count"]])
        sync_batchnorm_stats(model, ctx)  # every rank evaluates and saves the same running statistics
        with RngFork():
            val = _evaluate(model, val_loader, dev, recipe, val_sharded)
        if val["acc"] > state.best_val_acc:
            state.best_val_acc, state.best_val_epoch = val["acc"], epoch
            if keep_best:
                state.best_state = state_dict_cpu(model)
        row = {"epoch": epoch, "lr": sums["lr_first"], "lr_end": lr, "train_loss": train_loss_sum / train_count,
               "train_acc": train_correct / train_count, "val_loss": val["loss"], "val_acc": val["acc"],
               "seconds": sums["seconds"] + time.perf_counter() - epoch_started}
        state.history.append(row)
        save_checkpoint(epoch + 1, 0)
        metrics.append(row)
        if ctx.is_main:
            log.info("epoch %d/%d lr %.3g train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs", epoch + 1,
                     recipe.epochs, row["lr"], row["train_loss"], row["train_acc"], row["val_loss"],
                     row["val_acc"], row["seconds"])
    return _finish(state, model, recipe, test_loader, ctx, keep_best, ckpt_path, started)


def _finish(state: ResumeState, model: nn.Module, recipe: Recipe, test_loader: Iterable[Any] | None,
            ctx: DistContext, keep_best: bool, ckpt_path: Path | None, started: float) -> TrainResult:
    """The result record: final/best validation figures and the test pass(es) after training."""
    history = state.history
    if not history:
        raise CheckpointError("nothing was trained and the checkpoint holds no history")
    result = TrainResult(
        recipe=recipe, epochs_completed=len(history), final_train_loss=history[-1]["train_loss"],
        final_train_acc=history[-1]["train_acc"], final_val_loss=history[-1]["val_loss"],
        final_val_acc=history[-1]["val_acc"], best_val_acc=state.best_val_acc, best_val_epoch=state.best_val_epoch,
        resumed_from=state.resumed_from, checkpoint_path=ckpt_path, history=history,
    )
    test_sharded = False
    if test_loader is not None:
        test_loader, test_sharded = prepare_eval_loader(test_loader, ctx)
        with RngFork():
            test = _evaluate(model, test_loader, ctx.device, recipe, test_sharded)
        result.test_loss, result.test_acc = test["loss"], test["acc"]
    if keep_best and state.best_state is not None:
        model.load_state_dict(state.best_state)
        if test_loader is not None:
            with RngFork():
                result.test_acc_best_val = _evaluate(model, test_loader, ctx.device, recipe, test_sharded)["acc"]
    result.seconds = time.perf_counter() - started
    return result
