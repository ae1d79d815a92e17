"""Typed views of the JSON records that the reports read (``metrics.json`` of ``pare prune`` and ``pare demo``).

A record is written as plain JSON (so older files and other tools can read it); :mod:`pare.report` reads it
back through these frozen dataclasses, which name every field it uses, their units (accuracies are fractions)
and which are optional, instead of scattering ``.get`` calls. Source: this project's design (issue #14).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pare.errors import ConfigError

Json = Mapping[str, object]


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _need(row: Json, key: str, what: str) -> object:
    if key not in row:
        raise ConfigError(f"{what}: record lacks '{key}'")
    return row[key]


@dataclass(frozen=True)
class Accuracy:
    """One evaluation: top-1/top-5 as fractions, images ``n``, mean cross-entropy ``loss`` (any may be None)."""

    top1: float | None
    top5: float | None = None
    n: int | None = None
    loss: float | None = None

    @classmethod
    def from_record(cls, row: Json) -> Accuracy:
        return cls(_float(row.get("top1")), _float(row.get("top5")), _int(row.get("n")), _float(row.get("loss")))


@dataclass(frozen=True)
class FinetuneSummary:
    """The fine-tuning part of a prune record: recipe name, epochs run, validation images, best validation top-1
    (fraction) and its epoch."""

    recipe: str | None
    epochs_completed: int | None
    val_images: int | None
    best_val_top1: float | None
    best_val_epoch: int | None

    @classmethod
    def from_record(cls, row: Json) -> FinetuneSummary:
        recipe = row.get("recipe")
        name = recipe.get("name") if isinstance(recipe, Mapping) else None
        return cls(None if name is None else str(name), _int(row.get("epochs_completed")), _int(row.get("val_images")),
                   _float(row.get("best_val_top1")), _int(row.get("best_val_epoch")))


@dataclass(frozen=True)
class DemoRow:
    """One model of the demo table: ``name`` ("dense" or a criterion), MACs and params per image, top-1 before
    and after fine-tuning (fractions), the MACs removed (fraction), median latency (ms) and wall time (s)."""

    name: str
    macs: int
    params: int
    top1: float | None
    top1_before_finetune: float | None = None
    macs_reduction: float | None = None
    latency_ms: float | None = None
    seconds: float | None = None

    @classmethod
    def from_record(cls, row: Json) -> DemoRow:
        latency = row.get("latency")
        median = latency.get("median_ms") if isinstance(latency, Mapping) else None
        return cls(str(_need(row, "name", "demo row")), int(_need(row, "macs", "demo row")),  # type: ignore[call-overload]
                   int(_need(row, "params", "demo row")), _float(row.get("top1")),  # type: ignore[call-overload]
                   _float(row.get("top1_before_finetune")), _float(row.get("macs_reduction")), _float(median),
                   _float(row.get("seconds")))
