"""CHIP (methods.md §1, §10 checks 7-11): exact fast scores, selection, determinism, BN copying."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pare
from pare.config import PruneConfig, RepairConfig
from pare.criteria import ScoreContext, get_criterion
from pare.criteria.chip import chip_scores, chip_scores_reference
from pare.models import create


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dup_rows(c: int, hw: int) -> torch.Tensor:
    a = torch.randn(3, c, hw, generator=_gen(2), dtype=torch.float64)
    a[:, 3] = a[:, 7]
    a[:, 5] = 2.5 * a[:, 1]
    return a


def _low_rank(c: int, hw: int) -> torch.Tensor:
    g = _gen(3)
    return torch.randn(3, c, 5, generator=g, dtype=torch.float64) @ torch.randn(5, hw, generator=g, dtype=torch.float64)


CASES = {
    "c16_hw64": lambda: torch.randn(3, 16, 64, generator=_gen(0), dtype=torch.float64),
    "c_gt_hw": lambda: torch.randn(3, 24, 8, generator=_gen(1), dtype=torch.float64),
    "duplicated_rows": lambda: _dup_rows(16, 64),
    "duplicated_rows_c_gt_hw": lambda: _dup_rows(20, 9),
    "rank5": lambda: _low_rank(16, 64),
    "post_relu_maps": lambda: torch.relu(torch.randn(3, 32, 8, 8, generator=_gen(4))) * 7,
    "one_channel": lambda: torch.randn(2, 1, 10, generator=_gen(5), dtype=torch.float64),
    "fully_connected": lambda: torch.randn(4, 6, generator=_gen(11), dtype=torch.float64),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_equals_svd_definition(case: str) -> None:
    """§10.7: the fast exact form equals ‖A‖_* − ‖M_i A‖_* by per-channel SVD to 1e-6 (float64)."""
    a = CASES[case]()
    ref = chip_scores_reference(a)
    fast = chip_scores(a)
    assert fast.shape == ref.shape == (a.shape[0], a.shape[1])
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    # Interlacing makes every CI non-negative.
    assert float(fast.min()) >= -1e-9


def test_reference_is_the_definition() -> None:
    """The reference itself: one hand-rolled channel against numpy's nuclear norm."""
    a = torch.randn(1, 6, 10, generator=_gen(6), dtype=torch.float64)
    masked = a[0].numpy().copy()
    masked[2] = 0
    expected = np.linalg.norm(a[0].numpy(), "nuc") - np.linalg.norm(masked, "nuc")
    assert abs(float(chip_scores_reference(a)[0, 2]) - expected) < 1e-12


@pytest.mark.parametrize("shape", [(2, 12, 30), (2, 30, 6)])
def test_zero_row_scores_zero(shape: tuple[int, int, int]) -> None:
    """§10.8: an all-zero row has CI = 0 to 1e-9, and the other rows still match the definition."""
    a = torch.randn(*shape, generator=_gen(7), dtype=torch.float64)
    a[:, 4] = 0
    fast, ref = chip_scores(a), chip_scores_reference(a)
    assert float(fast[:, 4].abs().max()) <= 1e-9
    assert float(ref[:, 4].abs().max()) <= 1e-9
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)


def test_all_zero_map_and_chunking() -> None:
    a = torch.randn(5, 8, 16, generator=_gen(8), dtype=torch.float64)
    a[2] = 0
    whole = chip_scores(a)
    assert torch.equal(whole[2], torch.zeros(8, dtype=torch.float64))
    torch.testing.assert_close(chip_scores(a, chunk=2), whole, rtol=0, atol=1e-12)


class _Net(nn.Module):
    """conv-BN-ReLU -> conv-BN-ReLU -> GAP -> linear; every hidden group is a plain CHIP layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _net_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    net = _Net().double().eval()
    g = _gen(9)
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.3)
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    data = [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]
    return net, data


def test_criterion_equals_definition_on_a_model() -> None:
    """CHIP scores of a model equal the mean over images of the per-channel SVD definition on its ReLU maps."""
    net, data = _net_and_data()
    graph = pare.trace(net, data[0][0].double())
    ctx = ScoreContext(graph, net, data)
    fast = get_criterion("chip").score(ctx, graph.prunable_groups)
    exact = get_criterion("chip", exact=True).score(ctx, graph.prunable_groups)
    maps: list[torch.Tensor] = []
    with torch.no_grad():
        for x, _ in data:
            maps.append(torch.relu(net.bn1(net.conv1(x.double()))))
    by_hand = chip_scores_reference(torch.cat(maps)).mean(0).numpy()
    np.testing.assert_allclose(exact["conv1"], by_hand, rtol=0, atol=1e-12)
    for gid in exact:
        np.testing.assert_allclose(fast[gid], exact[gid], rtol=0, atol=1e-6)


def test_selection_surgery_and_bn_copy() -> None:
    """§10.9 and §10.11: keep exactly k = int(c·(1 − p)) largest CI, indices ascending, the next conv's input
    slice and the BN slices follow the same indices after surgery (reset_bn lives with the allocation helper)."""
    net, data = _net_and_data()
    graph = pare.trace(net, data[0][0].double())
    ctx = ScoreContext(graph, net, data)
    crit = get_criterion("chip")
    group = graph.group("conv1")
    scores = crit.score(ctx, [group])["conv1"]
    c, p = group.size, 0.4
    k = int(c * (1 - p))
    removed = crit.select(ctx, group, scores, c - k)
    keep = np.setdiff1d(np.arange(c), removed)
    assert keep.size == k and np.all(np.diff(keep) > 0) and np.all(np.diff(removed) > 0)
    assert set(keep.tolist()) == set(np.argsort(scores)[-k:].tolist())
    assert scores[keep].min() >= scores[removed].max()
    pruned = graph.prune({"conv1": removed.tolist()}, verify=True)
    kt = torch.as_tensor(keep)
    assert torch.equal(pruned.conv1.weight, net.conv1.weight[kt])
    assert torch.equal(pruned.conv2.weight, net.conv2.weight[:, kt])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(pruned.bn1, name), getattr(net.bn1, name)[kt])


def test_deterministic_and_shared_calibration_set() -> None:
    """§10.10: identical CI arrays on repeated runs; a group's scores do not depend on which other groups are
    scored (one calibration set for all layers); the model's train/eval mode is restored."""
    net, data = _net_and_data()
    net.train()
    graph = pare.trace(net, data[0][0].double())
    ctx = ScoreContext(graph, net, data, seed=3)
    crit = get_criterion("chip")
    first = crit.score(ctx, graph.prunable_groups)
    second = crit.score(ctx, graph.prunable_groups)
    alone = crit.score(ctx, [graph.group("conv2")])
    for gid in first:
        assert np.array_equal(first[gid], second[gid])
    assert np.array_equal(alone["conv2"], first["conv2"])
    assert net.training and net.bn1.training


def test_needs_data() -> None:
    net, data = _net_and_data()
    graph = pare.trace(net, data[0][0].double())
    with pytest.raises(pare.ConfigError, match="calibration data"):
        get_criterion("chip").score(ScoreContext(graph, net, None), graph.prunable_groups)


def test_group_scope_on_padded_shortcut_groups() -> None:
    """A ResNet map that carries two groups: scope='group' scores each group's channels alone; 'node' takes the
    whole map and slices it."""
    torch.manual_seed(0)
    model = create("resnet20").eval()
    x = torch.randn(4, 3, 16, 16, generator=_gen(10))
    graph = pare.trace(model, x[:2])
    ids = [g.id for g in graph.prunable_groups if g.id.startswith("layer2.0.conv2")]
    assert len(ids) == 2
    ctx = ScoreContext(graph, model, [(x, torch.zeros(4, dtype=torch.long))])
    groups = [graph.group(i) for i in ids]
    node = get_criterion("chip", scope="node").score(ctx, groups)
    grp = get_criterion("chip", scope="group").score(ctx, groups)
    capture = graph.capture([graph.feature_node(ids[0])])
    with torch.no_grad():
        fmap = next(iter(capture(x).values()))
    for gid in ids:
        pos = torch.as_tensor(graph.positions(gid, graph.feature_node(gid)))
        np.testing.assert_allclose(grp[gid], chip_scores_reference(fmap[:, pos]).mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(node[gid], chip_scores_reference(fmap).mean(0).numpy()[pos], atol=1e-5)


@pytest.mark.parametrize("reset_bn", [False, True])
def test_bn_after_chip_surgery(reset_bn: bool) -> None:
    """§10.11 through ``pare.prune``: after CHIP surgery the surviving channels' BN γ/β/running mean/running var
    equal the originals' slices; with ``reset_bn=True`` every BN of a pruned group is (1, 0, 0, 1)."""
    net, data = _net_and_data()
    x = data[0][0].double()
    res = pare.prune(net, x, criterion='chip', target=pare.Budget(channel_ratio=0.4),
                     data=[(images.double(), labels) for images, labels in data],
                         config=PruneConfig(allocation="uniform", reset_bn=reset_bn),
                     repair=RepairConfig(recalibrate=False, compensate=False))
    assert set(res.removals) == {"conv1", "conv2"}
    for gid, bn_name in (("conv1", "bn1"), ("conv2", "bn2")):
        orig, new = getattr(net, bn_name), getattr(res.model, bn_name)
        kept = torch.as_tensor(np.setdiff1d(np.arange(orig.num_features), res.removals[gid]))
        assert 0 < kept.numel() < orig.num_features
        assert new.num_features == kept.numel()
        if reset_bn:
            expected = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
            for name, value in expected.items():
                assert torch.equal(getattr(new, name), torch.full_like(getattr(new, name), value)), name
        else:
            for name in ("weight", "bias", "running_mean", "running_var"):
                assert torch.equal(getattr(new, name), getattr(orig, name)[kept]), name
    # The input model keeps its BN state either way (its γ were drawn in [0.5, 1.5), never all 1).
    assert float(net.bn1.running_var.min()) >= 0.5 and float((net.bn1.weight.detach() - 1).abs().max()) > 0
