"""Fine-tuning recipes (methods.md §7.3) and the per-step learning-rate schedule (§1.3 item 5).

A :class:`Recipe` is a frozen configuration. The presets reproduce the recipes seen in the baselines; numbers
that the spec leaves open ("–" in the §7.3 table) are filled with the He et al. defaults and marked
``[design]`` below.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from pare.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant", "chip")


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of one training or fine-tuning run.

    ``batch_size`` is the *global* batch (summed over DDP ranks); the data loader is built with it.
    ``warmup_epochs`` is a linear warm-up applied on top of every schedule; for ``chip`` it is also the offset
    of the cosine (§1.3 item 5 uses 5).
    """

    name: str = "custom"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = False
    schedule: str = "cosine"
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None
    amp: bool = False
    channels_last: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Milestones arrive as lists from JSON/CLI; store a tuple so the recipe stays hashable.
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        _check(
            isinstance(self.epochs, int) and self.epochs >= 1,
            f"epochs must be an int >= 1, got {self.epochs}",
        )
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an int >= 1, got {self.batch_size}",
        )
        _check(self.lr > 0 and math.isfinite(self.lr), f"lr must be a finite number > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _check(not self.nesterov or self.momentum > 0, "nesterov=True needs momentum > 0")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            self.schedule in SCHEDULES,
            f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}",
        )
        _check(
            all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(set(self.milestones)),
            f"milestones must be strictly increasing epochs >= 1, got {list(self.milestones)}",
        )
        _check(self.gamma > 0, f"gamma must be > 0, got {self.gamma}")
        _check(
            isinstance(self.warmup_epochs, int) and 0 <= self.warmup_epochs <= self.epochs,
            f"warmup_epochs must be an int in [0, epochs], got {self.warmup_epochs}",
        )
        _check(
            self.schedule != "chip" or self.warmup_epochs < self.epochs,
            f"the chip schedule needs warmup_epochs < epochs, got {self.warmup_epochs} >= {self.epochs}",
        )
        _check(
            0.0 <= self.label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )
        _check(
            self.grad_clip_norm is None or self.grad_clip_norm > 0,
            f"grad_clip_norm must be None or > 0, got {self.grad_clip_norm}",
        )
        _check(0.0 <= self.distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        _check(
            self.distill_temperature > 0, f"distill_temperature must be > 0, got {self.distill_temperature}"
        )
        _check(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with some fields changed; unknown field names raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown recipe field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Primitive-only dict (JSON- and ``weights_only``-safe); ``milestones`` becomes a list."""
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return cls().replace(**values)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid recipe: {message}")


RECIPES: dict[str, Recipe] = {
    # Library default baseline training (§7.3 [design]).
    "cifar-standard": Recipe(
        name="cifar-standard",
        epochs=200,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
    ),
    # Li et al. 2017 retrain: 40 epochs at a constant 1e-3. Batch/momentum/wd are not given in the paper;
    # [design] the He et al. values it trained its baselines with (128, 0.9, 1e-4).
    "li2017": Recipe(
        name="li2017",
        epochs=40,
        batch_size=128,
        lr=1e-3,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="constant",
    ),
    # HRankPlus fine-tune: 150 epochs, batch 256, 0.01 with steps at 50/100.
    "hrankplus": Recipe(
        name="hrankplus",
        epochs=150,
        batch_size=256,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="step",
        milestones=(50, 100),
        gamma=0.1,
    ),
    # CHIP fine-tune, current README (§1.5): 400 epochs, batch 256, 0.01, 5-epoch warm-up + cosine, wd 5e-3.
    "chip": Recipe(
        name="chip",
        epochs=400,
        batch_size=256,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-3,
        schedule="chip",
        warmup_epochs=5,
    ),
    # Torch-Pruning fine-tune: 100 epochs at 0.01, steps at 60/80.
    "torchpruning": Recipe(
        name="torchpruning",
        epochs=100,
        batch_size=128,
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="step",
        milestones=(60, 80),
        gamma=0.1,
    ),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The preset called ``name`` with ``overrides`` applied; an unknown name raises :class:`ConfigError`."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[name].replace(**overrides) if overrides else RECIPES[name]


def lr_at(recipe: Recipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for iteration ``step`` (0-based, within the epoch) of ``epoch`` (0-based).

    * ``constant``: ``lr``.
    * ``step``: ``lr · gamma^(number of milestones <= epoch)``.
    * ``cosine``: per-step cosine from ``lr`` at the end of warm-up to 0 at the end of training,
      ``0.5·lr·(1 + cos(π·(t − W)/(epochs − W)))`` with ``t = epoch + step/steps_per_epoch``.
    * ``chip`` (§1.3 item 5, exactly the official code): ``0.5·lr·(1 + cos(π·(epoch − W)/(epochs − W)))`` with
      the *integer* epoch, for every epoch including the warm-up ones.

    During the first ``W = warmup_epochs`` epochs every schedule is multiplied by
    ``(1 + step + epoch·steps_per_epoch) / (W·steps_per_epoch)``.
    """
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch}")
    if not 0 <= epoch < recipe.epochs:
        raise ConfigError(f"epoch {epoch} is outside [0, {recipe.epochs})")
    if not 0 <= step < steps_per_epoch:
        raise ConfigError(f"step {step} is outside [0, {steps_per_epoch})")
    warmup = recipe.warmup_epochs
    if recipe.schedule == "constant":
        lr = recipe.lr
    elif recipe.schedule == "step":
        lr = recipe.lr * recipe.gamma ** sum(1 for m in recipe.milestones if epoch >= m)
    elif recipe.schedule == "cosine":
        progress_epochs = epoch + step / steps_per_epoch - warmup
        span_epochs = recipe.epochs - warmup
        lr = (
            recipe.lr
            if progress_epochs < 0 or span_epochs <= 0
            else (0.5 * recipe.lr * (1.0 + math.cos(math.pi * progress_epochs / span_epochs)))
        )
    else:  # chip
        lr = 0.5 * recipe.lr * (1.0 + math.cos(math.pi * (epoch - warmup) / (recipe.epochs - warmup)))
    if epoch < warmup:
        lr *= (1 + step + epoch * steps_per_epoch) / (warmup * steps_per_epoch)
    return lr
