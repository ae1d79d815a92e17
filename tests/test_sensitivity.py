"""Allocation from measured sensitivity (pare.allocate.sensitivity) and its use by pare.prune."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pare.allocate import Budget
from pare.allocate.sensitivity import _convex_marginals, sensitivity_curves, sensitivity_order
from pare.config import PruneConfig
from pare.graph import trace
from pare.prune import prune


def _two_branch() -> nn.Module:
    """Two parallel conv->BN->ReLU branches summed into one classifier: branch ``b``'s output is scaled by 1e-3,
    so removing its channels barely changes the loss, while branch ``a`` matters."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 8, 1))
            self.b = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 8, 1))
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x) + 1e-3 * self.b(x)
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.fc.weight.mul_(50.0)  # confident: with its own predictions as labels, the dense loss is near zero
    return net


def _data(model: nn.Module, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images labelled by the model itself, so that any damage raises the loss."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        images = torch.randn(32, 3, 8, 8, generator=g)
        with torch.no_grad():
            out.append((images, model(images).argmax(1)))
    return out


def test_curves_restore_the_model_and_rank_the_insensitive_branch_first() -> None:
    model = _two_branch()
    data = _data(model)
    x = torch.randn(1, 3, 8, 8)
    graph = trace(model, x)
    groups = [graph.group("a.0"), graph.group("b.0")]
    before = copy.deepcopy(model.state_dict())
    curves = sensitivity_curves(model, groups, lambda g, n: np.arange(n), data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [n for n, _ in curves["a.0"]] == [0, 3, 6, 10, 13]
    assert curves["a.0"][-1][1] > 100 * abs(curves["b.0"][-1][1])
    order = sensitivity_order(groups, curves, {"a.0": 1.0, "b.0": 1.0})
    assert order[:15] == ["b.0"] * 15


def test_convex_marginals_are_non_decreasing() -> None:
    curve = [(0, 0.0), (2, 0.5), (4, 0.4), (6, 2.0), (8, 2.1)]
    marg = _convex_marginals(curve, 10)
    assert marg.shape == (9,)
    assert np.all(np.diff(marg) >= -1e-12)
    # The minorant never lies above the (running-max) curve at a measured point.
    assert float(np.sum(marg[:6])) <= 2.0 + 1e-9


def test_prune_with_sensitivity_allocation_meets_the_budget() -> None:
    model = _two_branch()
    data = _data(model)
    x = torch.randn(1, 3, 8, 8)
    res = prune(model, x, criterion="l1", target=Budget(macs_reduction=0.3), data=data,
                config=PruneConfig(allocation="sensitivity", tolerance=0.02))  # two 16-channel groups: coarse
    assert abs(res.macs_reduction - 0.3) <= 0.02
    # The insensitive branch gives up more channels than the one the loss depends on.
    assert len(res.removals.get("b.0", [])) > len(res.removals.get("a.0", []))
