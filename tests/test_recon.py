"""Reconstruction-aware selection (pare.criteria.recon; this project's design, beyond the papers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pare
from pare.config import PruneConfig
from pare.criteria import ScoreContext, get_criterion
from pare.criteria.recon import obs_block_costs, obs_remove


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    return x @ x.T


def _best_without(w: torch.Tensor, g: torch.Tensor, removed: list[int]) -> tuple[torch.Tensor, float]:
    """Direct least squares: the W' with W'[:, removed] = 0 closest to W in the G metric, and its error."""
    keep = [i for i in range(w.shape[1]) if i not in removed]
    # min_V tr((V P - W) G (V P - W)^T) over the kept columns V: V = W G[:, keep] G[keep, keep]^{-1}
    v = torch.linalg.solve(g[keep][:, keep], (w @ g[:, keep]).T).T
    full = torch.zeros_like(w)
    full[:, keep] = v
    diff = full - w
    return full, float(torch.sum((diff @ g) * diff))


def test_obs_formula_equals_direct_least_squares() -> None:
    """ΔE of removing a block and the OBS refit equal a direct constrained least-squares solve, also after a
    first removal (the updated H is the inverse Gram of the remaining inputs)."""
    g = _spd(12, 0)
    w = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = torch.linalg.inv(g)
    blocks = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    costs = obs_block_costs(w, h, blocks)
    for b, block in enumerate(blocks):
        _, err = _best_without(w, g, block)
        assert float(costs[b]) == pytest.approx(err, rel=1e-9)
    w1, h1 = obs_remove(w, h, blocks[1])
    direct, _ = _best_without(w, g, blocks[1])
    torch.testing.assert_close(w1, direct, rtol=1e-9, atol=1e-10)
    # Second step: the incremental cost of also removing block 3 equals the direct two-block error minus the first.
    step2 = float(obs_block_costs(w1, h1, [blocks[3]])[0])
    _, err1 = _best_without(w, g, blocks[1])
    _, err13 = _best_without(w, g, blocks[1] + blocks[3])
    assert step2 == pytest.approx(err13 - err1, rel=1e-8)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_a_reconstructable_channel_goes_first_even_with_the_largest_norm() -> None:
    """Channel 2 is 3x channel 0 (ReLU is positively homogeneous, so its map is exactly 3x channel 0's): conv2 can
    absorb either one into the other, so both cost ~0 alone and recon removes one of them first, although L1 ranks
    channel 2 highest; once one is gone the other is essential and is never removed with it."""
    torch.manual_seed(0)
    net = _Net().double().eval()
    with torch.no_grad():
        net.conv1.weight[2] = 3.0 * net.conv1.weight[0]
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
            for _ in range(2)]
    graph = pare.trace(net, data[0][0][:1])
    ctx = ScoreContext(graph, net, data)
    group = graph.group("conv1")
    l1 = get_criterion("l1").score(ctx, [group])["conv1"]
    assert int(np.argmax(l1)) == 2
    crit = get_criterion("recon", positions=None, ridge=1e-9)
    scores = crit.score(ctx, [group])["conv1"]
    others = np.delete(scores, [0, 2])
    assert scores.shape == (6,) and max(scores[0], scores[2]) < 1e-6 * others.min()
    assert crit.select(ctx, group, scores, 1).tolist() in ([0], [2])
    for n in (2, 3):
        removed = crit.select(ctx, group, scores, n).tolist()
        assert len(removed) == n and removed == sorted(removed) and len({0, 2} & set(removed)) == 1


def test_prune_with_recon_end_to_end() -> None:
    torch.manual_seed(1)
    model = pare.models.create("resnet20").eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 3, 16, 16, generator=g), torch.zeros(8, dtype=torch.long))]
    x = data[0][0][:1]
    with pytest.raises(pare.ConfigError, match="recon"):
        pare.prune(model, x, criterion="recon", target=pare.Budget(macs_reduction=0.3))
    res = pare.prune(model, x, criterion='recon', target=pare.Budget(macs_reduction=0.3), data=data,
                     config=PruneConfig(allocation="uniform", internal_only=True))
    assert abs(res.macs_reduction - 0.3) <= 0.005 and res.criterion == "recon"
    assert res.model(data[0][0]).shape == (8, 10)
    with pytest.raises(pare.ConfigError, match="ridge"):
        get_criterion("recon", ridge=0.0)
