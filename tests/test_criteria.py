"""Baseline criteria (methods.md §6.1, §10 checks 9, 10, 34, 36, 37, 38, 39) and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pare
from pare.criteria import (
    ScoreContext,
    fpgm_scores,
    get_criterion,
    greedy_pruned_inputs,
    list_criteria,
)
from pare.models import create
from tests.randnets import RandomNet, randomize_norms

ALL = {"l1", "l2", "fpgm", "bn_scale", "random", "hrank", "taylor", "chip", "similarity", "recon"}


class _Net(nn.Module):
    """conv-BN-ReLU (a) -> conv-BN-ReLU (b) -> conv-BN-ReLU (c) -> GAP -> linear, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 5, 1)
        self.bn_c = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        x = torch.relu(self.bn_c(self.c(x)))
        return self.fc(x.mean((2, 3)))


def _setup(seed: int = 0, batches: int = 2) -> tuple[nn.Module, pare.ChannelGraph, ScoreContext]:
    torch.manual_seed(seed)
    net = _Net().double().eval()
    randomize_norms(net, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
            for _ in range(batches)]
    graph = pare.trace(net, data[0][0])
    return net, graph, ScoreContext(graph, net, data, seed=seed)


def test_registry() -> None:
    assert {c.name for c in list_criteria()} >= ALL
    for cls in list_criteria():
        assert cls.summary and cls.evidence
    assert get_criterion("hrank").needs_data and get_criterion("taylor").needs_labels
    assert not get_criterion("l1").needs_data
    with pytest.raises(pare.ConfigError, match="did you mean"):
        get_criterion("chipp")
    with pytest.raises(pare.ConfigError):
        get_criterion("fpgm", distance="manhattan")


def test_l1_l2_bn_scale_formulas() -> None:
    """§10.34: L1 = Σ|W| over (c_in, kh, kw); L2 = its ℓ2 counterpart; bn_scale = |γ|."""
    net, graph, ctx = _setup()
    groups = [graph.group(g) for g in ("a", "b")]
    l1 = get_criterion("l1").score(ctx, groups)
    l2 = get_criterion("l2").score(ctx, groups)
    bn = get_criterion("bn_scale").score(ctx, groups)
    w = net.b.weight.detach()
    np.testing.assert_allclose(l1["b"], np.array([float(w[i].abs().sum()) for i in range(8)]), rtol=1e-14)
    np.testing.assert_allclose(l2["b"], np.array([float(w[i].norm()) for i in range(8)]), rtol=1e-14)
    np.testing.assert_array_equal(bn["a"], net.bn_a.weight.detach().abs().numpy())
    # the m smallest are pruned, per layer
    crit = get_criterion("l1")
    removed = crit.select(ctx, graph.group("b"), l1["b"], 3)
    np.testing.assert_array_equal(removed, np.sort(np.argsort(l1["b"])[:3]))


def test_l1_greedy_excludes_pruned_inputs() -> None:
    """§10.34: the greedy variant does not count kernels that read input maps already pruned."""
    net, graph, ctx = _setup()
    earlier = {"a": [1, 4]}
    hint = greedy_pruned_inputs(graph, earlier)
    assert hint == {"b": [1, 4]}
    greedy = get_criterion("l1", pruned_inputs=hint).score(ctx, [graph.group("b")])["b"]
    keep = [0, 2, 3, 5]
    w = net.b.weight.detach()[:, keep]
    np.testing.assert_allclose(greedy, w.abs().sum((1, 2, 3)).numpy(), rtol=1e-14)
    independent = get_criterion("l1").score(ctx, [graph.group("b")])["b"]
    assert np.all(greedy < independent)


def test_fpgm_formula_and_cosine() -> None:
    """§10.36: s_i = Σ_j ‖F_i − F_j‖₂; the smallest are pruned; the cosine option really uses 1 − cos."""
    net, graph, ctx = _setup()
    w = net.b.weight.detach().reshape(8, -1)
    loops = np.array([sum(float((w[i] - w[j]).norm()) for j in range(8)) for i in range(8)])
    score = get_criterion("fpgm").score(ctx, [graph.group("b")])["b"]
    np.testing.assert_allclose(score, loops, rtol=1e-12)
    removed = get_criterion("fpgm").select(ctx, graph.group("b"), score, 3)
    np.testing.assert_array_equal(removed, np.sort(np.argsort(loops)[:3]))
    unit = w / w.norm(dim=1, keepdim=True)
    cos_loops = np.array([sum(1.0 - float(unit[i] @ unit[j]) for j in range(8) if j != i) for i in range(8)])
    cos = get_criterion("fpgm", distance="cosine").score(ctx, [graph.group("b")])["b"]
    np.testing.assert_allclose(cos, cos_loops, rtol=1e-12)
    # Scale invariance tells the two distances apart: doubling a filter changes euclidean, not cosine.
    f = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f2 = f.clone()
    f2[0] *= 2
    assert torch.allclose(fpgm_scores(f, "cosine"), fpgm_scores(f2, "cosine"), atol=1e-12)
    assert not torch.allclose(fpgm_scores(f, "euclidean"), fpgm_scores(f2, "euclidean"))


def test_aggregate_over_residual_producers() -> None:
    """A residual group's score combines its producers' scores with ctx.aggregate."""
    model = create("resnet20").eval()
    graph = pare.trace(model, torch.randn(2, 3, 8, 8))
    group = graph.group("conv1")
    producers = [m for m in group.producers() if m.param == "weight"]
    assert len(producers) > 1
    per = []
    for m in producers:
        w = model.get_submodule(m.module).weight.detach().double()[m.offset : m.offset + group.size]
        per.append(w.abs().sum((1, 2, 3)).numpy())
    for how, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
        ctx = ScoreContext(graph, model, aggregate=how)
        np.testing.assert_allclose(get_criterion("l1").score(ctx, [group])["conv1"], fn(per, axis=0), rtol=1e-12)
    ctx = ScoreContext(graph, model, aggregate="first")
    np.testing.assert_allclose(get_criterion("l1").score(ctx, [group])["conv1"], per[0], rtol=1e-12)


def test_random_seeded() -> None:
    _, graph, ctx = _setup()
    crit = get_criterion("random")
    a = crit.score(ctx, graph.prunable_groups)
    b = crit.score(ctx, list(reversed(graph.prunable_groups)))
    other = crit.score(ScoreContext(graph, ctx.model, seed=ctx.seed + 1), graph.prunable_groups)
    for gid in a:
        assert np.array_equal(a[gid], b[gid]) and not np.array_equal(a[gid], other[gid])
        assert a[gid].min() >= 0 and a[gid].max() < 1
    assert not np.array_equal(a["a"], a["b"][:6])


def test_hrank_mean_rank() -> None:
    """§10.37: the score is the mean matrix rank of each post-ReLU map over the calibration images."""
    net, graph, ctx = _setup()
    with torch.no_grad():
        net.bn_b.bias[2] = -50.0  # a dead channel: rank 0
    maps = []
    with torch.no_grad():
        for x, _ in ctx.data:
            maps.append(torch.relu(net.bn_b(net.b(torch.relu(net.bn_a(net.a(x)))))))
    m = torch.cat(maps)
    expected = np.array([[int(torch.linalg.matrix_rank(m[n, c])) for c in range(8)] for n in range(m.shape[0])])
    score = get_criterion("hrank").score(ctx, [graph.group("b")])["b"]
    np.testing.assert_array_equal(score, expected.mean(0))
    assert score[2] == 0
    removed = get_criterion("hrank").select(ctx, graph.group("b"), score, 1)
    assert removed.tolist() == [2]


def _gate_scores(net: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """(gate·∂L/∂gate)² with a real gate of ones multiplying bn_b's ReLU output (per minibatch)."""
    gate = torch.ones(8, dtype=torch.float64, requires_grad=True)
    x, y = batch
    h = torch.relu(net.bn_a(net.a(x)))
    h = torch.relu(net.bn_b(net.b(h))) * gate[None, :, None, None]
    h = torch.relu(net.bn_c(net.c(h)))
    loss = nn.functional.cross_entropy(net.fc(h.mean((2, 3))), y)
    (grad,) = torch.autograd.grad(loss, gate)
    return (gate.detach() * grad).pow(2).numpy()


def test_taylor_gate_formula_and_momentum() -> None:
    """§10.38: per minibatch (gate·∂L/∂gate)² of a gate = 1; averaged with momentum 0.9 (first initialises);
    frequency=n averages n minibatches per window. Global ranking is the allocation helper's."""
    net, graph, ctx = _setup(batches=3)
    per = [_gate_scores(net, b) for b in ctx.data]
    group = graph.group("b")
    one = get_criterion("taylor").score(ScoreContext(graph, net, ctx.data[:1]), [group])["b"]
    np.testing.assert_allclose(one, per[0], rtol=1e-10, atol=1e-30)
    ema = per[0]
    for s in per[1:]:
        ema = 0.9 * ema + 0.1 * s
    got = get_criterion("taylor").score(ctx, [group])["b"]
    np.testing.assert_allclose(got, ema, rtol=1e-10, atol=1e-30)
    windowed = get_criterion("taylor", frequency=2).score(ctx, [group])["b"]
    np.testing.assert_allclose(windowed, 0.9 * (per[0] + per[1]) / 2 + 0.1 * per[2], rtol=1e-10, atol=1e-30)
    assert net.a.weight.grad is None  # parameter gradients untouched
    with pytest.raises(pare.ConfigError):
        get_criterion("taylor", momentum=1.0)


def test_deterministic_scores() -> None:
    """§10.10: two scoring runs with the same seed and calibration set give identical arrays."""
    _, graph, ctx = _setup()
    for name in sorted(ALL):
        crit = get_criterion(name)
        a, b = crit.score(ctx, graph.prunable_groups), crit.score(ctx, graph.prunable_groups)
        assert a.keys() == b.keys() and a
        for gid in a:
            assert a[gid].dtype == np.float64 and a[gid].shape == (graph.group(gid).size,)
            assert np.array_equal(a[gid], b[gid]), (name, gid)


def _prune_with(name: str, model: nn.Module, x: torch.Tensor, fraction: float) -> nn.Module:
    graph = pare.trace(model, x[:2])
    labels = torch.arange(x.shape[0]) % 3
    ctx = ScoreContext(graph, model, [(x, labels)], seed=1)
    crit = get_criterion(name)
    scores = crit.score(ctx, graph.prunable_groups)
    removals = {}
    for g in graph.prunable_groups:
        if g.id not in scores:
            continue
        n = (int(g.size * fraction) // g.block) * g.block
        if 0 < n < g.size:
            removals[g.id] = crit.select(ctx, g, scores[g.id], n).tolist()
            assert len(removals[g.id]) == n
    assert removals
    return graph.prune(removals, verify=True)


@pytest.mark.parametrize("name", sorted(ALL))
def test_surgery_consistency_any_criterion(name: str) -> None:
    """§10.39: pruning each criterion's selection through the engine verifies (pruned == masked original)."""
    torch.manual_seed(0)
    spec = [("residual", 4), ("concat", 1), ("groupnorm", 0), ("conv", 3), ("residual", 2)]
    model = RandomNet(spec, "gap", size=8).double().eval()
    randomize_norms(model, torch.Generator().manual_seed(1))
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pruned = _prune_with(name, model, x, 0.4)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
