"""The one-call API (pare.prune.prune) and least-squares compensation (pare.compensate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pare.allocate import Budget
from pare.compensate import compensate, consumers
from pare.count import count
from pare.criteria.base import Criterion, ScoreContext
from pare.errors import ConfigError
from pare.graph import trace
from pare.models import create
from pare.prune import PruneResult, prune


class FirstChannels(Criterion):
    """Test-only criterion: channel i scores i, so the lowest indices go first (deterministic)."""

    name = "test_first_channels"
    summary = "channel index (tests)"
    evidence = "test helper"

    def score(self, ctx: ScoreContext, groups):  # type: ignore[no-untyped-def]
        return {g.id: np.arange(g.size, dtype=np.float64) for g in groups}


class NeedsData(FirstChannels):
    name = "test_needs_data"
    needs_data = True


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


def _data(n_batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 3, 12, 12, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(n_batches)]


def test_prune_result_fields_and_counts() -> None:
    model = create("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    res = prune(model, x, criterion=FirstChannels(), target=Budget(macs_reduction=0.5))
    assert isinstance(res, PruneResult)
    assert res.criterion == "test_first_channels" and res.allocation == "global" and res.residual_mode == "grouped"
    assert res.counts_before.macs == 40_551_040
    assert res.counts_after.macs == count(res.model, x).macs
    assert res.reduction["macs_reduction"] == pytest.approx(1 - res.counts_after.macs / res.counts_before.macs)
    assert abs(res.macs_reduction - 0.5) <= 0.005
    assert {"trace", "score", "allocate", "surgery", "count"} <= set(res.seconds)
    assert sum(g["removed"] for g in res.groups) == sum(len(v) for v in res.removals.values())
    for gid, idx in res.removals.items():  # the criterion ranks low indices first
        assert idx == list(range(len(idx))), gid
    summary = res.summary()
    assert summary["counts_after"]["convention"] == "macs" and summary["budget"] == "macs_reduction=0.5"
    assert res.model(x).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # the input model is left untouched


def test_chip_convention_is_used_on_both_sides() -> None:
    model = create("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    res = prune(model, x, criterion=FirstChannels(), target=Budget(macs_reduction=0.3), convention="chip")
    assert res.counts_before.convention == res.counts_after.convention == "chip"
    assert abs(res.macs_reduction - 0.3) <= 0.005


def test_data_requirements_are_named() -> None:
    model = _toy()
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(ConfigError, match="test_needs_data"):
        prune(model, x, criterion=NeedsData(), target=Budget(channel_ratio=0.25))
    with pytest.raises(ConfigError, match="compensate"):
        prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.25), compensate=True)
    with pytest.raises(ConfigError, match="recalibration"):
        prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.25), recalibrate=2)
    with pytest.raises(ConfigError, match="allocation"):
        prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.25), allocation="greedy")
    res = prune(model, x, criterion=NeedsData(), target=Budget(channel_ratio=0.25), data=_data(1))
    assert res.removals


def _consumer_error(original: nn.Module, pruned: nn.Module, data: list, name: str,
                    keep_out: slice = slice(None)) -> float:
    """Mean squared difference of a layer's output (without bias) between the pruned and original models."""
    outs: dict[str, list[torch.Tensor]] = {"o": [], "p": []}

    def hook(key: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            bias = mod.bias.view(1, -1, 1, 1) if mod.bias is not None else 0
            outs[key].append((out - bias).detach())
        return fn

    h1 = original.get_submodule(name).register_forward_hook(hook("o"))
    h2 = pruned.get_submodule(name).register_forward_hook(hook("p"))
    with torch.no_grad():
        for images, _ in data:
            original(images)
            pruned(images)
    h1.remove()
    h2.remove()
    return float(sum(((o[:, keep_out] - p) ** 2).sum() for o, p in zip(outs["o"], outs["p"], strict=True)))


def test_compensation_strictly_reduces_consumer_error() -> None:
    model = _toy()
    x = torch.randn(1, 3, 12, 12)
    data = _data(4)
    graph = trace(model, x)
    gid = graph.prunable_groups[0].id  # the first conv's 12 channels, consumed by conv "3"
    removals = {gid: [0, 2, 5, 7, 9]}
    plain = graph.prune(removals)
    fixed = graph.prune(removals)
    assert consumers(graph, fixed, removals) == ["3"]
    report = compensate(model, fixed, graph, removals, data, positions=None)
    before = _consumer_error(model, plain, data, "3")
    after = _consumer_error(model, fixed, data, "3")
    assert after < 0.9 * before
    assert report["3"]["after"] < report["3"]["before"]
    # The solver's own error figures agree with the measured ones (same data, all positions).
    assert report["3"]["before"] == pytest.approx(before / _total_energy(model, data, "3"), rel=1e-6)


def _total_energy(model: nn.Module, data: list, name: str) -> float:
    acc = []
    h = model.get_submodule(name).register_forward_hook(
        lambda m, i, o: acc.append(((o - m.bias.view(1, -1, 1, 1)) ** 2).sum().item()))
    with torch.no_grad():
        for images, _ in data:
            model(images)
    h.remove()
    return float(sum(acc))


def test_prune_with_compensation_and_recalibration() -> None:
    model = _toy()
    x = torch.randn(1, 3, 12, 12)
    data = _data(3)
    res = prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.5), allocation="uniform",
                data=data, compensate=True)
    assert res.compensation and all(v["after"] <= v["before"] for v in res.compensation.values())
    assert {"compensate", "recalibrate"} <= set(res.seconds)
    bn = res.model[1]
    assert bn.num_features == 6 and bn.momentum == 0.1  # recalibrated, momentum restored
