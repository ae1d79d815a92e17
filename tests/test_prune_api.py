"""The one-call API (pare.prune.prune) and least-squares compensation (pare.compensate)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pare.allocate import Budget
from pare.compensate import compensate, consumers
from pare.config import PruneConfig, RepairConfig
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
    # Defaults without data: global ranking; block-internal channels since ResNet-20 has them.
    assert res.criterion == "test_first_channels" and res.allocation == "global" and res.residual_mode == "internal"
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
    res = prune(model, x, criterion=FirstChannels(), target=Budget(macs_reduction=0.3),
                config=PruneConfig(convention="chip"))
    assert res.counts_before.convention == res.counts_after.convention == "chip"
    assert abs(res.macs_reduction - 0.3) <= 0.005


def test_data_requirements_are_named() -> None:
    model = _toy()
    x = torch.randn(1, 3, 12, 12)
    with pytest.raises(ConfigError, match="test_needs_data"):
        prune(model, x, criterion=NeedsData(), target=Budget(channel_ratio=0.25))
    with pytest.raises(ConfigError, match="compensation"):
        prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.25),
              repair=RepairConfig(recalibrate=True, compensate=True))
    with pytest.raises(ConfigError, match="recalibration"):
        prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.25),
              repair=RepairConfig(recalibrate=True, recalibrate_batches=2))
    with pytest.raises(ConfigError, match="allocation"):
        prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.25),
              config=PruneConfig(allocation="greedy"))
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
    res = prune(model, x, criterion=FirstChannels(), target=Budget(channel_ratio=0.5), data=data,
                config=PruneConfig(allocation="uniform"), repair=RepairConfig(recalibrate=True, compensate=True))
    assert res.compensation and all(v["after"] <= v["before"] for v in res.compensation.values())
    assert {"compensate", "recalibrate"} <= set(res.seconds)
    bn = res.model[1]
    assert bn.num_features == 6 and bn.momentum == 0.1  # recalibrated, momentum restored


def _chain(linear_between: bool = False) -> nn.Module:
    """conv(3->8) -> [BN-ReLU] -> conv(8->8) -> [BN-ReLU] -> conv(8->6): two groups, each with one consumer."""
    torch.manual_seed(2)
    act = (lambda c: [nn.Identity()]) if linear_between else (lambda c: [nn.BatchNorm2d(c), nn.ReLU()])
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), *act(8),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), *act(8),
                        nn.Conv2d(8, 6, 3, padding=1, bias=False)).double().eval()
    if not linear_between:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for bn in (net[1], net[4]):
                bn.running_mean.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 0.1)
                bn.bias.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 0.3)
    return net


def _chain_data(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return [torch.randn(8, 3, 10, 10, generator=g, dtype=torch.float64) for _ in range(n)]


def _output_error(a: nn.Module, b: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(sum(((a(x) - b(x)) ** 2).sum() for x in data))


def test_sequential_solve_fits_the_last_layer_at_least_as_well() -> None:
    """The second consumer is fitted on the inputs left by the first one's new weights, so the network output
    error (the last conv has no removed outputs) is <= the independent solve's; the first consumer sees
    unchanged inputs in both orders and gets the same weights."""
    net = _chain()
    data = _chain_data()
    graph = trace(net, data[0][:1])
    ids = [g.id for g in graph.prunable_groups]
    removals = {ids[0]: [1, 4, 6], ids[1]: [0, 3, 5]}
    seq, ind = graph.prune(removals), graph.prune(removals)
    assert consumers(graph, seq, removals) == ["3", "6"]
    r_seq = compensate(net, seq, graph, removals, data, positions=None, ridge=0.0, method="sequential")
    r_ind = compensate(net, ind, graph, removals, data, positions=None, ridge=0.0, method="independent")
    torch.testing.assert_close(seq[3].weight, ind[3].weight, rtol=1e-9, atol=1e-9)
    assert r_seq["3"]["after"] == pytest.approx(r_ind["3"]["after"], rel=1e-6)
    plain = graph.prune(removals)
    e_plain, e_seq, e_ind = (_output_error(net, m, data) for m in (plain, seq, ind))
    assert e_seq <= e_ind * (1 + 1e-9) and e_seq < e_plain
    # The sequential report of the last layer is its actual output error (relative to the output energy).
    with torch.no_grad():
        energy = float(sum((net(x) ** 2).sum() for x in data))
    assert r_seq["6"]["after"] == pytest.approx(e_seq / energy, rel=1e-6)
    assert r_seq["6"]["after"] < r_ind["6"]["after"] or e_seq < e_ind  # the stale fit is measurably worse


def test_sequential_solve_recovers_exactly_when_kept_channels_span_removed_ones() -> None:
    """Linear layers between the convs and removed filters that are combinations of kept ones: the removed
    channels' contributions are linear in the kept channels' patches, so least squares (float64, no ridge, all
    positions) reproduces the original output, through two compensated layers in sequence."""
    net = _chain(linear_between=True)
    with torch.no_grad():
        for conv in (net[0], net[2]):
            w = conv.weight
            w[5] = 0.7 * w[0] - 1.3 * w[2]
            w[6] = 2.0 * w[1] + 0.5 * w[3]
    data = _chain_data()
    graph = trace(net, data[0][:1])
    ids = [g.id for g in graph.prunable_groups]
    removals = {ids[0]: [5, 6], ids[1]: [5, 6]}
    pruned = graph.prune(removals)
    assert _output_error(net, pruned, data) > 1e-2  # plain removal is far off
    compensate(net, pruned, graph, removals, data, positions=None, ridge=0.0, method="sequential")
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(pruned(x), net(x), rtol=0, atol=1e-8)


def test_compensate_options_are_checked() -> None:
    net = _chain()
    data = _chain_data(1)
    graph = trace(net, data[0][:1])
    removals = {graph.prunable_groups[0].id: [0]}
    with pytest.raises(ConfigError, match="method"):
        compensate(net, graph.prune(removals), graph, removals, data, method="joint")
    with pytest.raises(ConfigError, match="positions"):
        compensate(net, graph.prune(removals), graph, removals, data, positions=0)


class _TwoBlocks(nn.Module):
    """stem -> two residual blocks (conv-BN-ReLU-conv-BN + identity module, ReLU) -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        for b in ("b1", "b2"):
            setattr(self, f"{b}c1", nn.Conv2d(6, 8, 3, padding=1, bias=False))
            setattr(self, f"{b}n1", nn.BatchNorm2d(8))
            setattr(self, f"{b}c2", nn.Conv2d(8, 6, 3, padding=1, bias=False))
            setattr(self, f"{b}n2", nn.BatchNorm2d(6))
            setattr(self, f"{b}s", nn.Identity())
        self.fc = nn.Linear(6, 4)

    def block(self, b: str, x: torch.Tensor) -> torch.Tensor:
        """The pre-ReLU sum of block ``b``: (N, 6, H, W)."""
        h = torch.relu(getattr(self, f"{b}n1")(getattr(self, f"{b}c1")(x)))
        return getattr(self, f"{b}n2")(getattr(self, f"{b}c2")(h)) + getattr(self, f"{b}s")(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.block("b1", x))
        x = torch.relu(self.block("b2", x))
        return self.fc(x.mean((2, 3)))


def _two_blocks() -> nn.Module:
    torch.manual_seed(5)
    net = _TwoBlocks().double().eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
    return net


def test_residual_targets_fit_the_sum_after_the_addition() -> None:
    """With residual=True the last block's conv2 is the least-squares fit of the original pre-ReLU *sum* given the
    pruned model's own inputs and shortcut (checked against a direct solve in float64); without it, the fit of
    the conv output alone. The first variant's sum error is the smaller one on the same inputs."""
    net = _two_blocks()
    data = _chain_data()
    graph = trace(net, data[0][:1])
    removals = {"b1c1": [0, 3, 5], "b2c1": [1, 2, 6]}
    fits = {}
    for residual in (True, False):
        pruned = graph.prune(removals)
        compensate(net, pruned, graph, removals, data, positions=None, ridge=0.0, residual=residual)
        fits[residual] = pruned
    pruned = fits[True]

    def grab(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        got: dict[str, torch.Tensor] = {}
        hs = [model.b2c2.register_forward_pre_hook(lambda m, i: got.__setitem__("x", i[0])),
              model.b2c2.register_forward_hook(lambda m, i, o: got.__setitem__("y", o)),
              model.b2s.register_forward_hook(lambda m, i, o: got.__setitem__("s", o))]
        with torch.no_grad():
            model(x)
        for h in hs:
            h.remove()
        return got

    def cols(t: torch.Tensor) -> torch.Tensor:  # im2col, (C*9, N*H*W), image-major columns
        return torch.nn.functional.unfold(t, 3, padding=1).permute(1, 0, 2).reshape(t.shape[1] * 9, -1)

    def flat(t: torch.Tensor) -> torch.Tensor:  # (C, N*H*W) in the same column order
        return t.flatten(2).permute(1, 0, 2).reshape(t.shape[1], -1)

    scale = (torch.sqrt(net.b2n2.running_var + net.b2n2.eps) / net.b2n2.weight).detach()[:, None]
    xs, t_sum, t_out = [], [], []
    for x in data:
        o, p = grab(net, x), grab(pruned, x)
        xs.append(cols(p["x"]))
        t_out.append(flat(o["y"]))
        t_sum.append(flat(o["y"]) + scale * (flat(o["s"]) - flat(p["s"])))
    x_all, y_sum, y_out = torch.cat(xs, 1), torch.cat(t_sum, 1), torch.cat(t_out, 1)
    w_sum = torch.linalg.solve(x_all @ x_all.T, x_all @ y_sum.T).T
    torch.testing.assert_close(pruned.b2c2.weight.detach().reshape(6, -1), w_sum, rtol=1e-7, atol=1e-9)
    w_out = torch.linalg.solve(x_all @ x_all.T, x_all @ y_out.T).T
    assert float(((y_sum - w_sum @ x_all) ** 2).sum()) < float(((y_sum - w_out @ x_all) ** 2).sum())
    assert not torch.allclose(fits[False].b2c2.weight, pruned.b2c2.weight)
