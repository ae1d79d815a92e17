"""Fine-tuning: recipes (methods.md §7.3), the training loop (:mod:`~pare.train.trainer`, one step in
:mod:`~pare.train.step`), its resume state (:mod:`~pare.train.resume`, atomic checkpoints), the typed hook
protocol (:mod:`~pare.train.hooks`) and DDP support.

Evaluation has one implementation, :func:`pare.evaluate.evaluate`, which the trainer calls."""

from __future__ import annotations

from pare.errors import TrainingDivergedError
from pare.train.checkpoint import atomic_torch_save, load_checkpoint
from pare.train.distributed import DistContext, setup_distributed
from pare.train.hooks import Hook, TrainHook
from pare.train.recipe import RECIPES, SCHEDULES, Recipe, get_recipe, lr_at
from pare.train.step import build_optimizer
from pare.train.trainer import TrainResult, fit

__all__ = [
    "RECIPES",
    "SCHEDULES",
    "DistContext",
    "Hook",
    "Recipe",
    "TrainHook",
    "TrainResult",
    "TrainingDivergedError",
    "atomic_torch_save",
    "build_optimizer",
    "fit",
    "get_recipe",
    "load_checkpoint",
    "lr_at",
    "setup_distributed",
]
