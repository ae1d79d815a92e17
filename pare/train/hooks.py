"""The training hooks: what :func:`pare.train.fit` calls at fixed points of the loop, as one typed protocol.

A hook subclasses :class:`Hook` and overrides the methods it needs; the others do nothing. ``fit`` accepts only
objects that implement the whole :class:`TrainHook` protocol (a :class:`Hook` subclass does), so a misspelt
method name is an error at the call of ``fit`` rather than a silently skipped hook. Every method receives the
unwrapped model (not the DistributedDataParallel wrapper). Source: this project's design (issue #14).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pare.errors import ConfigError

HOOK_METHODS = ("on_epoch_start", "on_epoch_end", "on_loss", "after_backward", "after_step", "state_dict",
                "load_state_dict")


@runtime_checkable
class TrainHook(Protocol):
    """The points of the loop a hook sees, in the order they occur."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        """At the start of each epoch (again when resuming inside that epoch)."""

    def on_loss(self, model: nn.Module, loss: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        """Return the loss to back-propagate, e.g. with a regulariser added; ``batch`` is on the device."""

    def after_backward(self, model: nn.Module) -> None:
        """Gradients are complete, all-reduced and unscaled (e.g. a BN-γ subgradient)."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        """After the optimizer step (e.g. a proximal step at the current learning rate)."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """After the epoch's last step, before validation and the epoch checkpoint."""

    def state_dict(self) -> dict[str, Any] | None:
        """State stored in the checkpoint (tensors and primitives only); None = nothing to store."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class Hook:
    """A :class:`TrainHook` that does nothing; subclass it and override what you need."""

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        return None

    def on_loss(self, model: nn.Module, loss: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        return loss

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        return None

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def check_hooks(hooks: Sequence[object]) -> tuple[TrainHook, ...]:
    """The hooks as a tuple; ConfigError naming the first object that does not implement :class:`TrainHook`."""
    for hook in hooks:
        if not isinstance(hook, TrainHook):
            missing = [name for name in HOOK_METHODS if not callable(getattr(hook, name, None))]
            raise ConfigError(f"hook {type(hook).__name__} does not implement pare.train.TrainHook (missing "
                              f"{', '.join(missing)}); subclass pare.train.Hook")
    return tuple(hooks)  # type: ignore[arg-type]
