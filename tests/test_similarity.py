"""Similarity clustering, reconstructed from the abstract (methods.md §4.2, §10 checks 26-29)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from torch import nn

import pare
from pare.config import PruneConfig
from pare.criteria import ScoreContext, get_criterion
from pare.criteria import similarity as sim
from pare.models import create


def test_distance_hand_computed() -> None:
    """§10.26: D² on hand-computed cases; symmetric, non-negative, zero diagonal."""
    gamma = np.array([1.0, 2.0, -0.5])
    beta = np.array([0.0, 1.0, 0.5])
    rho = np.array([[1.0, 0.5, -1.0], [0.5, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    d2 = sim.similarity_distance(gamma, beta, rho)
    # (0-1)² + 1 + 4 - 2·1·2·0.5 = 4;  (0-0.5)² + 1 + 0.25 - 2·1·(-0.5)·(-1) = 0.5;  (1-0.5)² + 4 + 0.25 - 0 = 4.5
    expected = np.array([[0.0, 4.0, 0.5], [4.0, 0.0, 4.5], [0.5, 4.5, 0.0]])
    np.testing.assert_allclose(d2, expected, rtol=0, atol=1e-15)
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.normal(size=(9, 20)))
    d2 = sim.similarity_distance(rng.normal(size=9), rng.normal(size=9), sim.cosine_matrix(w))
    assert np.array_equal(d2, d2.T) and d2.min() >= 0 and np.all(np.diag(d2) == 0)
    # D² ≥ (|γi| − |γj|)² (Cauchy-Schwarz on the Gaussian model)
    g = rng.normal(size=9)
    d2 = sim.similarity_distance(g, np.zeros(9), sim.cosine_matrix(w))
    assert np.all(d2 >= (np.abs(g)[:, None] - np.abs(g)[None, :]) ** 2 - 1e-12)


def test_distance_monte_carlo() -> None:
    """§10.26: E[(y_i − y_j)²] by sampling isotropic Gaussian inputs, with μ_i, σ_i the true mean and std of w_iᵀx,
    agrees with D² within sampling error."""
    rng = np.random.default_rng(1)
    d, c, n = 12, 4, 400_000
    w = rng.normal(size=(c, d))
    w[1] = 0.8 * w[0] + 0.3 * rng.normal(size=d)  # a strongly correlated pair
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    mu, sigma = np.zeros(c), np.linalg.norm(w, axis=1)  # x ~ N(0, I): w·x ~ N(0, ‖w‖²)
    x = rng.normal(size=(n, d))
    y = gamma * ((x @ w.T) - mu) / sigma + beta  # (n, c)
    d2 = sim.similarity_distance(gamma, beta, sim.cosine_matrix(torch.from_numpy(w)))
    for i in range(c):
        for j in range(c):
            diff2 = (y[:, i] - y[:, j]) ** 2
            se = diff2.std() / np.sqrt(n)
            assert abs(diff2.mean() - d2[i, j]) <= 5 * se + 1e-12


def test_cut_exactly_k_and_default_average() -> None:
    """§10.27: cutting at k clusters gives exactly k (also with ties); average linkage is the default."""
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(12, 3))
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    for k in range(1, 13):
        clusters = sim.cut_clusters(d2, k)
        assert len(clusters) == k
        assert sorted(i for m in clusters for i in m) == list(range(12))
    # all-equal channels: fcluster(maxclust) could not split them; the cut still yields k clusters
    assert len(sim.cut_clusters(np.zeros((6, 6)), 4)) == 4
    # default linkage is average: same partition as scipy's average linkage cut at 3
    ours = sim.cut_clusters(d2, 3)
    labels = hierarchy.fcluster(hierarchy.linkage(squareform(np.sqrt(d2), checks=False), "average"), 3, "maxclust")
    theirs = sorted(sorted(np.flatnonzero(labels == lab).tolist()) for lab in np.unique(labels))
    assert sorted(ours) == theirs
    assert get_criterion("similarity").linkage == "average"
    for linkage in ("single", "complete", "ward"):
        assert len(sim.cut_clusters(d2, 5, linkage)) == 5


class _Net(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = _Net().double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) - 0.5)
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g, dtype=torch.float64) + 0.5)
    return net


def test_select_keeps_k_representatives_max_gamma() -> None:
    """§10.27: exactly k = size − n_remove channels kept, one per cluster, the max-|γ| member; score is |γ|."""
    net = _net()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    graph = pare.trace(net, x)
    ctx = ScoreContext(graph, net)
    crit = get_criterion("similarity")
    group = graph.group("conv1")
    scores = crit.score(ctx, [group])
    np.testing.assert_array_equal(scores["conv1"], net.bn1.weight.detach().abs().numpy())
    for n_remove in (0, 1, 3, 7):
        removed = crit.select(ctx, group, scores["conv1"], n_remove)
        assert removed.size == n_remove and np.all(np.diff(removed) > 0)
        if n_remove == 0:
            continue
        reps = crit.last_clusters["conv1"]
        assert len(reps) == group.size - n_remove
        gamma = net.bn1.weight.detach().abs().numpy()
        for rep, members in reps.items():
            assert gamma[rep] == gamma[members].max()
        kept = sorted(reps)
        assert kept == sorted(set(range(group.size)) - set(removed.tolist()))
    medoid = get_criterion("similarity", representative="medoid").select(ctx, group, scores["conv1"], 3)
    assert medoid.size == 3


def _scaled_pair_net(r: int, j: int, s: float) -> nn.Module:
    """A net whose conv1 channel j is s times channel r after BN (same filter and statistics, scaled γ and β)."""
    net = _net(1)
    with torch.no_grad():
        net.conv1.weight[j] = net.conv1.weight[r]
        net.bn1.running_mean[j] = net.bn1.running_mean[r]
        net.bn1.running_var[j] = net.bn1.running_var[r]
        net.bn1.weight[j] = s * net.bn1.weight[r]
        net.bn1.bias[j] = s * net.bn1.bias[r]
    return net


def test_merge_identical_up_to_positive_scale_is_exact() -> None:
    """§10.28: channel j = s·channel r (same filter, γ_j = s·γ_r, β_j = s·β_r, same BN statistics): with merge the
    pruned model equals the original to 1e-10 (float64); merge is off by default (select leaves weights alone)."""
    r, j, s = 2, 5, 1.7
    net = _scaled_pair_net(r, j, s)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = net(x)
    graph = pare.trace(net, x[:2])
    ctx = ScoreContext(graph, net)
    crit = get_criterion("similarity")
    group = graph.group("conv1")
    d2, _ = crit.distances(ctx, group)
    g_r, b_r = float(net.bn1.weight[r].detach()), float(net.bn1.bias[r].detach())
    assert abs(d2[r, j] - (s - 1) ** 2 * (g_r**2 + b_r**2)) < 1e-12  # ρ = 1: only the scale differs
    snapshot = net.conv2.weight.detach().clone()
    crit.select(ctx, group, crit.score(ctx, [group])["conv1"], 1)
    assert torch.equal(net.conv2.weight, snapshot)  # nothing merged unless asked
    # Negative control: removing j without the merge changes the outputs.
    with torch.no_grad():
        assert float((graph.prune({"conv1": [j]})(x) - before).abs().max()) > 1e-6
    reps = {r: [r, j], **{i: [i] for i in range(group.size) if i not in (r, j)}}
    sim.merge_into_representatives(net, graph, "conv1", reps)
    pruned = graph.prune({"conv1": [j]}, verify=True)
    with torch.no_grad():
        after = pruned(x)
    assert float((after - before).abs().max()) <= 1e-10


def test_merge_refuses_residual_groups() -> None:
    model = create("resnet20").double().eval()
    graph = pare.trace(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(pare.PruneError, match="producers"):
        sim.merge_into_representatives(model, graph, "conv1", {0: [0, 1]})


def test_residual_groups_skipped_by_default() -> None:
    model = create("resnet20").eval()
    graph = pare.trace(model, torch.randn(2, 3, 8, 8))
    ctx = ScoreContext(graph, model)
    crit = get_criterion("similarity")
    scores = crit.score(ctx, graph.prunable_groups)
    multi = [g for g in graph.prunable_groups if len({m.module for m in g.producers()}) > 1]
    assert multi and all(g.id not in scores for g in multi)
    assert {g.id for g in graph.prunable_groups} - {g.id for g in multi} == set(scores)
    with pytest.raises(pare.ConfigError, match="skipped"):
        crit.select(ctx, multi[0], np.ones(multi[0].size), 2)
    first = get_criterion("similarity", residual="first").score(ctx, graph.prunable_groups)
    assert set(first) == {g.id for g in graph.prunable_groups}


def test_data_rho_is_preactivation_correlation() -> None:
    """rho='data': ρ is the empirical correlation of the pre-BN maps over the calibration pixels."""
    net = _net(2)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
            for _ in range(2)]
    graph = pare.trace(net, data[0][0])
    crit = get_criterion("similarity", rho="data")
    assert crit.needs_data
    ctx = ScoreContext(graph, net, data)
    d2, gamma = crit.distances(ctx, graph.group("conv1"))
    with torch.no_grad():
        pre = torch.cat([net.conv1(x) for x, _ in data]).movedim(1, -1).reshape(-1, 8)
    rho = np.corrcoef(pre.numpy().T)
    beta = net.bn1.bias.detach().numpy()
    np.testing.assert_allclose(d2, sim.similarity_distance(gamma, beta, rho), rtol=0, atol=1e-10)


def test_labelled_reconstructed() -> None:
    """§10.29: docstring, registry summary and evidence say 'reconstructed from the abstract'."""
    cls = type(get_criterion("similarity"))
    phrase = "reconstructed from the abstract"
    assert phrase in (cls.__doc__ or "") and phrase in (sim.__doc__ or "")
    assert phrase in cls.summary and phrase in cls.evidence


def _multi_producer_group(graph: pare.ChannelGraph) -> pare.Group:
    return next(g for g in graph.prunable_groups if len({m.module for m in g.producers()}) > 2)


def test_residual_sum_is_the_sum_over_producers() -> None:
    """residual='sum': D² of a coupled residual group is the sum over its producers of each conv + following-BN
    distance (hand-built from the modules), γ the L² norm of the producers' γ, and every group is scored."""
    torch.manual_seed(0)
    model = create("resnet20").double().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    graph = pare.trace(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    ctx = ScoreContext(graph, model)
    crit = get_criterion("similarity", residual="sum")
    scores = crit.score(ctx, graph.prunable_groups)
    assert set(scores) == {g.id for g in graph.prunable_groups}
    group = _multi_producer_group(graph)
    # Stage 1's residual channels: the stem and every block's conv2, and (option-A zero-padded shortcuts) the
    # stage-2/3 conv2 output channels at the same positions of their wider maps.
    assert group.id == "conv1"
    producers = [m for m in group.producers() if m.param == "weight"]
    assert len(producers) == 10
    d2_hand = np.zeros((16, 16))
    gamma_sq = np.zeros(16)
    for m in producers:
        rows = slice(m.offset, m.offset + 16)
        bn = model.get_submodule(m.module.replace("conv", "bn"))
        w = model.get_submodule(m.module).weight.detach()[rows].reshape(16, -1)
        gm, bt = bn.weight.detach()[rows].numpy(), bn.bias.detach()[rows].numpy()
        d2_hand += sim.similarity_distance(gm, bt, sim.cosine_matrix(w))
        gamma_sq += gm ** 2
    d2, gamma = crit.distances(ctx, group)
    np.testing.assert_allclose(d2, d2_hand, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gamma, np.sqrt(gamma_sq), rtol=1e-12)
    np.testing.assert_allclose(scores[group.id], np.sqrt(gamma_sq), rtol=1e-12)
    # The first producer alone (residual='first') gives a different, smaller distance.
    d2_first, _ = get_criterion("similarity", residual="first").distances(ctx, group)
    assert np.all(d2_first <= d2 + 1e-12) and not np.allclose(d2_first, d2)


def test_residual_sum_clusters_channels_equal_in_every_producer() -> None:
    """Two residual channels identical in every producer (filters and BN) are at D² = 0, so removing one channel
    of the group removes one of those two."""
    torch.manual_seed(1)
    model = create("resnet20").double().eval()
    graph = pare.trace(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    a, b = 3, 11
    with torch.no_grad():
        for m in _multi_producer_group(graph).producers():
            if m.param != "weight":
                continue
            conv, bn = model.get_submodule(m.module), model.get_submodule(m.module.replace("conv", "bn"))
            for t in (conv.weight, bn.weight, bn.bias):
                t[m.offset + b] = t[m.offset + a]
    graph = pare.trace(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    ctx = ScoreContext(graph, model)
    crit = get_criterion("similarity", residual="sum")
    d2, _ = crit.distances(ctx, graph.group("conv1"))
    assert d2[a, b] <= 1e-12 and np.delete(d2[a], [a, b]).min() > 1e-3
    removed = crit.select(ctx, graph.group("conv1"), np.ones(16), 1)
    assert removed.tolist() in ([a], [b])


def test_residual_sum_data_rho_and_grouped_prune() -> None:
    """rho='data' with residual='sum' keeps one correlation per producer; pare.prune in grouped mode (which used
    to fail with 'no scores for group conv1') prunes the residual groups."""
    model = create("resnet20").eval()
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(4, 3, 16, 16, generator=g), torch.zeros(4, dtype=torch.long))]
    graph = pare.trace(model, data[0][0][:1])
    crit = get_criterion("similarity", residual="sum", rho="data")
    ctx = ScoreContext(graph, model, data)
    crit.score(ctx, graph.prunable_groups)
    group = _multi_producer_group(graph)
    n_producers = len({m.module for m in group.producers()})
    assert sum(k.startswith(f"{group.id}@") for k in crit._rho_cache) == n_producers
    res = pare.prune(model, data[0][0][:1], criterion=get_criterion("similarity", residual="sum"),
                     target=pare.Budget(macs_reduction=0.3), config=PruneConfig(internal_only=False))
    assert res.removals.get("conv1") and abs(res.macs_reduction - 0.3) <= 0.005
    assert res.model(data[0][0]).shape == (4, 10)
