"""One optimisation step of :func:`pare.train.fit` and what it needs: the batch plumbing, the task loss
(cross-entropy with optional distillation) and the optimizer. Source: methods.md §7.3 (recipes, distillation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pare.errors import ConfigError, TrainingDivergedError
from pare.train.hooks import TrainHook
from pare.train.recipe import Recipe


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    elif isinstance(batch, dict) and "images" in batch and "labels" in batch:
        images, labels = batch["images"], batch["labels"]
    else:
        raise ConfigError(f"a batch must be (images, labels); got {type(batch).__name__}")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ConfigError("a batch must hold tensors (images, labels)")
    return images, labels


def to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    # Soft/one-hot targets (N, C) count as correct when their argmax is predicted.
    targets = labels.argmax(dim=1) if labels.dim() == 2 else labels
    return int((logits.argmax(dim=1) == targets).sum().item())


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


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


def task_loss_of(
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


@dataclass
class Loop:
    """The fixed parts of one run that every step needs."""

    model: nn.Module  # unwrapped; what hooks, checkpoints and evaluation see
    train_model: nn.Module  # the DDP wrapper under torchrun, else ``model``
    teacher: nn.Module | None
    recipe: Recipe
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    hooks: tuple[TrainHook, ...]
    device: torch.device
    use_amp: bool


def train_step(loop: Loop, batch: Any, epoch: int, step: int, lr: float, sums: dict[str, float]) -> float:
    """One optimisation step; adds to the epoch ``sums``; returns the task loss."""
    recipe = loop.recipe
    images, labels = to_device(*split_batch(batch), loop.device, recipe.channels_last)
    teacher_logits = None
    if loop.teacher is not None and recipe.distill_alpha > 0:
        with torch.no_grad(), autocast(loop.device, loop.use_amp):
            teacher_logits = loop.teacher(images)
    with autocast(loop.device, loop.use_amp):
        logits = loop.train_model(images)
    task_loss = task_loss_of(logits, labels, teacher_logits, recipe)
    loss = task_loss
    for hook in loop.hooks:
        loss = hook.on_loss(loop.model, loss, (images, labels))
    if not torch.isfinite(loss.detach()).all():
        raise TrainingDivergedError(f"non-finite loss {loss.item()} at epoch {epoch} step {step}; lower the LR")
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scaler.scale(loss).backward()
    loop.scaler.unscale_(loop.optimizer)  # hooks and clipping must see true gradients
    for hook in loop.hooks:
        hook.after_backward(loop.model)
    if recipe.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(loop.model.parameters(), recipe.grad_clip_norm)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    for hook in loop.hooks:
        hook.after_step(loop.model, loop.optimizer, lr)
    n = int(labels.shape[0])
    value = float(task_loss.detach().item())
    sums["loss"] += value * n
    sums["correct"] += correct(logits.detach(), labels)
    sums["count"] += n
    return value
