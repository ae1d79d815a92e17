"""Engine tests: zoo models, regressions of Torch-Pruning's open bugs, freezing, and invalid requests."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import pare
from pare.errors import EquivalenceError, PruneError
from pare.models import create, list_models
from tests.randnets import assert_untouched, random_removals, randomize_norms, snapshot

ZOO_INPUTS = {
    "resnet18": (1, 3, 64, 64), "resnet34": (1, 3, 64, 64), "resnet50": (1, 3, 64, 64),
    "mobilenet_v2": (1, 3, 64, 64), "small_cnn": (2, 1, 8, 8),
}


def _third(graph: pare.ChannelGraph, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    removals = {}
    for g in graph.prunable_groups:
        units = g.size // g.block
        n = units // 3
        if n:
            chosen = rng.choice(units, size=n, replace=False)
            removals[g.id] = sorted(int(u) * g.block + k for u in chosen for k in range(g.block))
    return removals


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_prunes_a_third_of_every_group_and_verifies(name):
    torch.manual_seed(0)
    model = create(name).eval()
    randomize_norms(model, torch.Generator().manual_seed(1))
    x = torch.randn(*ZOO_INPUTS.get(name, (2, 3, 32, 32)))
    before = snapshot(model, x)
    graph = pare.trace(model, x)
    assert graph.prunable_groups, name
    removals = _third(graph, 0)
    pruned = graph.prune(removals, verify=True)
    assert_untouched(model, x, before)  # identical outputs, state_dict and modes after pruning
    assert type(pruned) is type(model)  # zoo models need no code rewriting: they stay their own class
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    pruned(x)


def test_option_a_resnet56_residual_groups_are_prunable_and_correct():
    """Torch-Pruning builds a broken model from this network; pare couples the pad shortcuts instead."""
    model = create("resnet56").eval()
    randomize_norms(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    graph = pare.trace(model, x)
    ids = [g.id for g in graph.prunable_groups]
    # stem group (couples all stage-1 block outputs), pad regions of stages 2 and 3, 27 internal groups
    assert "conv1" in ids
    assert sum(1 for g in ids if g.startswith("layer") and g.endswith(".conv1")) == 27
    residual = [g for g in graph.prunable_groups if len(g.producers()) > 2]
    assert residual, "residual sums must form coupled groups"
    pruned = graph.prune(random_removals(graph, np.random.default_rng(0), 0.5), verify=True)
    assert pruned(x).shape == (2, 10)


def test_cat_of_the_same_tensor_twice():
    """Torch-Pruning #146: torch.cat([x, x]) must remove the channel from both copies."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(12, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(torch.cat([y, y], 1))

    model, x = Net().double(), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    graph = pare.trace(model, x)
    pruned = graph.prune({"a": [0, 4]}, verify=True)
    assert pruned.b.in_channels == 8 and pruned.a.out_channels == 4


def test_concat_of_different_sources():
    """Torch-Pruning #481: a concat of different producers keeps each producer's offset."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 5, 3, padding=1)
            self.b = nn.Conv2d(3, 7, 1)
            self.c = nn.Conv2d(3, 2, 1)
            self.head = nn.Conv2d(14, 3, 1)

        def forward(self, x):
            return self.head(torch.cat([self.a(x), F.relu(self.b(x)), self.c(x)], dim=1))

    model, x = Net().double(), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    graph = pare.trace(model, x)
    pruned = graph.prune({"a": [1], "b": [0, 6], "c": [1]}, verify=True)
    assert pruned.head.in_channels == 10


def test_split_offsets_after_repeated_pruning():
    """Torch-Pruning #352: split sizes must follow the kept channels, also when pruning a pruned model."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 12, 3, padding=1)
            self.left = nn.Conv2d(4, 3, 1)
            self.right = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            lo, hi = torch.split(self.a(x), [4, 8], dim=1)
            return self.left(lo) + self.right(hi)

    model, x = Net().double(), torch.randn(2, 3, 5, 5, dtype=torch.float64)
    graph = pare.trace(model, x)
    assert {g.id for g in graph.prunable_groups} >= {"a[0:4]", "a[4:12]"}
    first = graph.prune({"a[0:4]": [0], "a[4:12]": [1, 2]}, verify=True)
    assert isinstance(first, fx.GraphModule)  # the split sizes are code, so the graph was rewritten
    again = pare.trace(first, x)
    second = again.prune({"a[0:3]": [2], "a[3:9]": [0, 5]}, verify=True)
    assert second.a.out_channels == 6
    assert second(x).shape == (2, 3, 5, 5)


class _Roll(nn.Module):
    """Uses an operator pare does not model (a channel roll)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.c(torch.roll(y, 1, dims=1))


def test_unknown_operator_freezes_its_channels_with_a_warning():
    model, x = _Roll(), torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match="roll"):
        graph = pare.trace(model, x)
    assert not graph.group("b").prunable and "roll" in graph.group("b").reason
    assert graph.group("a").prunable
    pruned = graph.prune({"a": [1, 2]}, verify=True)
    assert pruned(x).shape == (1, 4, 4, 4)
    with pytest.raises(PruneError, match="frozen"):
        graph.prune({"b": [0]})


def test_untraceable_submodule_becomes_opaque_and_frozen():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.odd = DataDependent()
            self.b = nn.Conv2d(4, 2, 1)
            self.c = nn.Conv2d(3, 5, 1)
            self.d = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.b(self.odd(self.a(x))) + self.d(self.c(x))

    x = torch.randn(1, 3, 4, 4)
    with pytest.warns(UserWarning, match="odd"):
        graph = pare.trace(Net(), x)
    assert not graph.group("a").prunable
    assert graph.group("c").prunable
    graph.prune({"c": [0, 3]}, verify=True)


def test_model_inputs_and_outputs_are_never_prunable():
    model = create("resnet20")
    graph = pare.trace(model, torch.randn(1, 3, 32, 32))
    assert not graph.groups[0].prunable and graph.groups[0].reason == "model input channels"
    assert not graph.group("linear").prunable


@pytest.mark.parametrize(
    ("removals", "message"),
    [
        ({"nope": [0]}, "unknown group"),
        ({"layer1.0.conv1": [16]}, "out of range"),
        ({"layer1.0.conv1": [-1]}, "out of range"),
        ({"layer1.0.conv1": [3, 3]}, "duplicate"),
        ({"layer1.0.conv1": list(range(16))}, "all 16"),
        ({"linear": [0]}, "frozen"),
    ],
)
def test_invalid_removals_are_refused(removals, message):
    graph = pare.trace(create("resnet20"), torch.randn(1, 3, 32, 32))
    with pytest.raises(PruneError, match=message):
        graph.prune(removals)


def test_groupnorm_removes_whole_groups_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 2, 1)).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    graph = pare.trace(model, x)
    assert graph.group("0").block == 2
    with pytest.raises(PruneError, match="whole aligned blocks"):
        graph.prune({"0": [0]})
    pruned = graph.prune({"0": [2, 3]}, verify=True)
    assert pruned[1].num_groups == 3 and pruned[1].num_channels == 6


def test_pruning_keeps_dtype_grad_flags_mode_and_bn_statistics():
    model = create("resnet20").double().train()
    randomize_norms(model, torch.Generator().manual_seed(0))
    model.layer1[0].conv1.weight.requires_grad_(False)
    graph = pare.trace(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    pruned = graph.prune({"layer1.0.conv1": [0, 5]})
    assert pruned.training
    conv, bn = pruned.layer1[0].conv1, pruned.layer1[0].bn1
    assert conv.weight.dtype == torch.float64 and not conv.weight.requires_grad
    keep = [i for i in range(16) if i not in (0, 5)]
    assert torch.equal(bn.running_mean, model.layer1[0].bn1.running_mean[keep])
    assert torch.equal(bn.weight.detach(), model.layer1[0].bn1.weight.detach()[keep])
    assert torch.equal(pruned.layer1[0].conv2.weight, model.layer1[0].conv2.weight[:, keep])
    # the original is untouched
    assert model.layer1[0].conv1.out_channels == 16


def test_depthwise_stays_depthwise():
    model = create("mobilenet_v2").eval()
    x = torch.randn(1, 3, 64, 64)
    graph = pare.trace(model, x)
    gid = next(g.id for g in graph.prunable_groups if g.id == "features.2.conv.0.0")
    pruned = graph.prune({gid: list(range(0, 96, 2))}, verify=True)
    dw = pruned.features[2].conv[1][0]
    assert dw.groups == dw.in_channels == dw.out_channels == 48


def test_verify_detects_a_wrong_surgery(monkeypatch):
    """Negative control: corrupt one kept weight during surgery and the equivalence check must name the node."""
    model = create("resnet20").double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = pare.trace(model, x)
    from pare.graph import rules

    original = rules.ConvRule.rebuild

    def corrupt(self, ctx, node, m, keep):
        new = original(self, ctx, node, m, keep)
        if new is not None and node.target == "layer2.0.conv2":
            with torch.no_grad():
                new.weight[0, 0, 0, 0] += 1.0
        return new

    monkeypatch.setattr(rules.ConvRule, "rebuild", corrupt)
    removals = {g.id: [0] for g in graph.prunable_groups}
    with pytest.raises(EquivalenceError) as err:
        graph.prune(removals, verify=True)
    assert err.value.node == "layer2_0_conv2"


def test_feature_node_follows_chip_conventions():
    graph = pare.trace(create("resnet20"), torch.randn(1, 3, 32, 32))
    assert graph.feature_node("layer1.0.conv1").target == "layer1.0.relu1"
    stem = graph.feature_node("conv1")
    assert stem.target == "relu"  # the stem ReLU output carries the stage-1 residual channels
    capture = graph.capture([stem])
    out = capture(torch.randn(1, 3, 32, 32))
    assert out[stem.name].shape == (1, 16, 32, 32)


def test_trace_warns_once_and_repr():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = pare.trace(create("resnet20"), torch.randn(1, 3, 32, 32))
    assert "prunable" in repr(graph)
