"""The default pipeline is the configuration chosen on validation, and every criterion runs under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pare.criteria  # noqa: F401  (registers the criteria)
from pare.allocate import Budget
from pare.config import DEFAULT_PIPELINE, PruneConfig, RepairConfig
from pare.criteria.base import list_criteria
from pare.models import create
from pare.prune import prune

CHOICE = Path(__file__).resolve().parents[1] / "bench" / "results" / "accuracy_choice.json"


def test_defaults_are_the_validation_choice() -> None:
    """pare.config.DEFAULT_PIPELINE must be what bench/accuracy.py's choose stage picked (bench/results)."""
    choice = json.loads(CHOICE.read_text())["choice"]
    assert {k: choice[k] for k in ("criterion", "allocation", "internal_only", "repair")} == DEFAULT_PIPELINE


def _calibration(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        images = torch.randn(32, 1, 12, 12, generator=g)
        with torch.no_grad():
            out.append((images, model(images).argmax(1)))
    return out


@pytest.mark.parametrize("criterion", ["auto", *sorted(c.name for c in list_criteria())])
def test_every_criterion_runs_under_the_default_pipeline(criterion: str) -> None:
    """With calibration data and nothing else set: sensitivity allocation, block-internal channels, BN
    recalibration + compensation, verified surgery; the budget is met."""
    torch.manual_seed(0)
    model = create("small_cnn").eval()
    data = _calibration(model)
    x = data[0][0][:1]
    res = prune(model, x, criterion=criterion, target=Budget(macs_reduction=0.3), data=data,
                config=PruneConfig(tolerance=0.02))
    assert res.allocation == "sensitivity" and res.residual_mode == "internal"
    assert "recalibrate" in res.seconds and "compensate" in res.seconds
    assert abs(res.macs_reduction - 0.3) <= 0.02
    if criterion == "auto":
        assert res.criterion == DEFAULT_PIPELINE["criterion"]


def test_without_data_the_defaults_are_data_free() -> None:
    model = create("small_cnn").eval()
    res = prune(model, torch.randn(1, 1, 12, 12), target=Budget(macs_reduction=0.3), config=PruneConfig(tolerance=0.02))
    assert res.criterion == "l1" and res.allocation == "global" and "recalibrate" not in res.seconds
    off = RepairConfig(recalibrate=False, compensate=False)
    assert not off.resolved(True).active and RepairConfig().resolved(True).compensate
