"""What a fine-tuning run needs to continue bit-exactly after an interruption: :class:`ResumeState`, written to
``out_dir/checkpoint.pt`` by :func:`pare.train.fit` after every epoch (and every ``checkpoint_every_steps``).

The checkpoint holds the model, optimizer and GradScaler states, the step counters, per-rank RNG states, the
running sums of the current epoch, the best-on-validation weights and the metrics history; it is accepted only
for the same recipe, world size and batches per epoch. Source: this project's design (methods.md §7.4).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.errors import CheckpointError
from pare.train.checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, atomic_torch_save, load_checkpoint
from pare.train.hooks import TrainHook
from pare.train.recipe import Recipe

METRICS_NAME = "metrics.jsonl"


def state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def fresh_sums() -> dict[str, float]:
    """Running sums of one epoch (loss, hits and images of the training batches, wall time, first LR)."""
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0, "lr_first": 0.0}


@dataclass
class ResumeState:
    """The loop's progress. ``epoch``/``step``: the next step to run; ``rng``: per-rank RNG states to restore
    (None once restored); ``resumed_from``: (epoch, step) when this state came from a checkpoint."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_acc: float = -math.inf
    best_val_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None
    sums: dict[str, float] = field(default_factory=fresh_sums)
    rng: dict[str, Any] | None = None
    resumed_from: tuple[int, int] | None = None

    @classmethod
    def load(cls, path: Path, *, recipe: Recipe, world_size: int, rank: int, steps_per_epoch: int,
             model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             hooks: tuple[TrainHook, ...]) -> ResumeState:
        """Read ``path``, check that it belongs to this run, and load the model/optimizer/scaler/hook states."""
        state = load_checkpoint(path)
        if state.get("recipe") != recipe.to_dict():
            raise CheckpointError(f"{path} was written with another recipe; use a new out_dir or resume=False")
        if state.get("world_size") != world_size:
            raise CheckpointError(f"{path} was written with world size {state.get('world_size')}, this run has "
                                  f"{world_size}")
        if state.get("steps_per_epoch") != steps_per_epoch:
            raise CheckpointError(f"{path} has {state.get('steps_per_epoch')} steps per epoch, this loader "
                                  f"{steps_per_epoch}")
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path} does not match this model: {str(exc).splitlines()[0]}") from exc
        for hook, hook_state in zip(hooks, state.get("hooks", [])):
            if hook_state is not None:
                hook.load_state_dict(hook_state)
        return cls(epoch=state["epoch"], step=state["step"], global_step=state["global_step"],
                   history=list(state["history"]), best_val_acc=state["best_val_acc"],
                   best_val_epoch=state["best_val_epoch"], best_state=state.get("best_state"),
                   sums=dict(state["epoch_sums"]), rng=state["rng"][rank],
                   resumed_from=(state["epoch"], state["step"]))

    def save(self, path: Path, *, epoch: int, step: int, recipe: Recipe, world_size: int, steps_per_epoch: int,
             model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             hooks: tuple[TrainHook, ...], rng_all: list[dict[str, Any]]) -> None:
        """Write the checkpoint atomically; ``epoch``/``step`` name the next step to run."""
        atomic_torch_save(
            {
                "format": "pare.train", "version": FORMAT_VERSION, "recipe": recipe.to_dict(),
                "world_size": world_size, "steps_per_epoch": steps_per_epoch, "epoch": epoch, "step": step,
                "global_step": self.global_step, "model": state_dict_cpu(model),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_all,
                "hooks": [hook.state_dict() for hook in hooks], "history": self.history,
                "best_val_acc": self.best_val_acc, "best_val_epoch": self.best_val_epoch,
                "best_state": self.best_state, "epoch_sums": dict(self.sums),
            },
            path,
        )


class MetricsWriter:
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


def clean_stale_temp_files(out_dir: Path) -> None:
    # A SIGKILL during atomic_torch_save leaves its temp file behind; the real checkpoint is untouched.
    for stale in out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)
