"""Fine-tuning: recipes (methods.md §7.3), the training loop with atomic checkpoint/resume, and DDP
support.

Evaluation has one implementation, :func:`pare.evaluate.evaluate`, which the trainer calls."""

from __future__ import annotations

from pare.train.checkpoint import atomic_torch_save, load_checkpoint
from pare.train.distributed import DistContext, setup_distributed
from pare.train.recipe import RECIPES, SCHEDULES, Recipe, get_recipe, lr_at
from pare.train.trainer import TrainingDivergedError, TrainResult, build_optimizer, fit

__all__ = [
    "RECIPES",
    "SCHEDULES",
    "DistContext",
    "Recipe",
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
