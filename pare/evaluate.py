"""Classification evaluation (top-k accuracy, mean cross-entropy) and BatchNorm statistics recalibration."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError, DataError


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) >= 2 else None
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise DataError(f"batch {index}: labels are a {type(labels).__name__}, expected a tensor")
        return batch[0], labels
    raise DataError(f"batch {index}: expected (images, labels) tensors, got {type(batch).__name__}")


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for module, training in flags:
        module.training = training


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP's forward would synchronise buffers and expect every rank to call it; evaluation uses the module.
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the ranks of the default process group (float64, so counts stay exact)."""
    # nccl only reduces device tensors; gloo reduces CPU tensors.
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    topk: Sequence[int] = (1, 5),
    channels_last: bool = False,
    amp: bool = False,
    all_reduce: bool = False,
) -> dict[str, float | int]:
    """Top-k accuracy and mean cross-entropy of a classifier over a data loader.

    This is the library's one evaluation function: the trainer (:func:`pare.train.fit`) uses it for its
    validation and test passes.

    Args:
        model: maps images (N, ...) to logits (N, C); a DistributedDataParallel wrapper is unwrapped. Run in
            eval mode under ``no_grad``; every module's training flag is restored afterwards.
        loader: iterable of ``(images, labels)``: images float (N, ...); labels int64 class indices (N,), or
            soft / one-hot targets float (N, C) (accuracy then counts the target's argmax, the loss is the
            soft-target cross-entropy).
        device: where to run; the model is moved there (``model.to``). Default: the model's current device.
        topk: which top-k accuracies to report; k larger than C counts as C (every sample is a hit).
        channels_last: feed 4-D images in channels-last memory format.
        amp: float16 autocast; acts on CUDA only (ignored elsewhere). The loss is computed in float32.
        all_reduce: each rank of an initialised ``torch.distributed`` group evaluated a disjoint part of the
            data; sum the hits, losses and counts over ranks so every rank returns the global metrics. Ignored
            when no group is initialised.

    Returns:
        ``{"top1": fraction, "top5": fraction, ..., "loss": mean cross-entropy per sample, "n": samples}``;
        accuracies are fractions in [0, 1] (percent only when printed).

    Raises:
        DataError: an empty loader (over all ranks), or a batch whose labels do not match the logits.
        ConfigError: a k below 1.
    """
    ks = [int(k) for k in topk]
    if any(k < 1 for k in ks):
        raise ConfigError(f"evaluate: topk values must be >= 1, got {list(topk)}")
    module = _unwrap(model)
    if device is not None:
        module.to(device)
    run_device = _model_device(module) if device is None else torch.device(device)
    use_amp = amp and run_device.type == "cuda"
    flags = _training_flags(module)
    hits = dict.fromkeys(ks, 0)
    loss_sum = 0.0
    count = 0
    module.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                images, labels = _split_batch(batch, index)
                if labels is None:
                    raise DataError(f"batch {index}: evaluation needs labels, the loader yields images only")
                images = images.to(run_device, non_blocking=True)
                if channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(run_device, non_blocking=True)
                with torch.autocast(device_type=run_device.type, dtype=torch.float16, enabled=use_amp):
                    logits = module(images)
                logits = logits.float()
                soft = labels.dim() == 2
                if logits.ndim != 2 or (labels.shape != logits.shape if soft else labels.shape != (logits.shape[0],)):
                    raise DataError(
                        f"batch {index}: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not "
                        "match; expected (N, C) with labels (N,) or soft targets (N, C)"
                    )
                num_classes = logits.shape[1]
                if soft:
                    targets = labels.argmax(dim=1)
                    loss_sum += float(F.cross_entropy(logits, labels.float(), reduction="sum"))
                else:
                    targets = labels.long()
                    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
                        raise DataError(f"batch {index}: labels outside [0, {num_classes - 1}]")
                    loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
                ranked = logits.topk(min(max(ks), num_classes), dim=1).indices
                correct = ranked.eq(targets[:, None])
                for k in ks:
                    hits[k] += int(correct[:, : min(k, num_classes)].any(dim=1).sum())
                count += targets.numel()
    finally:
        _restore_flags(flags)
    if all_reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        summed = _all_reduce_sum([loss_sum, float(count), *(float(hits[k]) for k in ks)], run_device)
        loss_sum, count = summed[0], round(summed[1])
        hits = {k: round(v) for k, v in zip(ks, summed[2:], strict=True)}
    if count == 0:
        raise DataError("evaluate: the loader yielded no samples")
    result: dict[str, float | int] = {f"top{k}": hits[k] / count for k in ks}
    result["loss"] = loss_sum / count
    result["n"] = count
    return result


def recalibrate_bn(model: nn.Module, loader: Iterable[Any], *, batches: int = 100) -> nn.Module:
    """Recompute BatchNorm running statistics from data, e.g. after pruning changed a layer's inputs.

    Every BatchNorm with running stats is reset and set to a cumulative average (``momentum=None``), so after
    ``b`` batches ``running_mean`` is the mean of the ``b`` batch means and ``running_var`` the mean of the
    ``b`` unbiased batch variances (exact data statistics when one batch holds all data). Only the BatchNorm
    layers are in train mode during the passes; dropout and everything else stay in eval mode. Momenta and
    every module's training flag are restored afterwards. Parameters are not touched (``no_grad``).

    Args:
        model: the network; modified in place and returned.
        loader: iterable of images (N, ...) or of ``(images, labels, ...)`` tuples; labels are ignored.
        batches: how many batches to use at most (fewer when the loader runs out).

    Raises:
        ConfigError: ``batches`` < 1.
        DataError: the loader yielded no batch.
    """
    if batches < 1:
        raise ConfigError(f"recalibrate_bn: batches must be >= 1, got {batches}")
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return model
    device = _model_device(model)
    flags = _training_flags(model)
    momenta = [(norm, norm.momentum) for norm in norms]
    # Kept so that a failed or empty pass leaves the model exactly as it was.
    saved = [
        (norm, {name: buf.clone() for name, buf in norm._buffers.items() if buf is not None})
        for norm in norms
    ]
    used = 0
    completed = False
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        with torch.no_grad():
            for index, batch in enumerate(itertools.islice(loader, batches)):
                images, _ = _split_batch(batch, index)
                model(images.to(device))
                used += 1
        completed = used > 0
    finally:
        for norm, momentum in momenta:
            norm.momentum = momentum
        _restore_flags(flags)
        if not completed:
            for norm, buffers in saved:
                for name, value in buffers.items():
                    norm._buffers[name].copy_(value)
    if used == 0:
        raise DataError("recalibrate_bn: the loader yielded no batches; running statistics left unchanged")
    return model
