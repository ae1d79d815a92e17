"""Models pruned elsewhere (pare.foreign) and Torch-Pruning as a pruning engine (pare.baselines.torch_pruning)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pare.allocate import Budget
from pare.compensate import compensate
from pare.count import count
from pare.errors import BudgetError, ConfigError, PruneError
from pare.foreign import infer_removals
from pare.graph import trace
from pare.models import create


def _trained_like(name: str, seed: int = 0) -> nn.Module:
    """A zoo model whose BN statistics and affine differ per channel, as in a trained network."""
    torch.manual_seed(seed)
    model = create(name).eval()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.normal_()
            mod.bias.data.normal_()
    return model


def _random_removals(graph, rng: np.random.Generator) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    out = {}
    for g in graph.prunable_groups:
        if g.block == 1 and g.size > 2 and rng.random() < 0.7:
            n = int(rng.integers(1, g.size - 1))
            out[g.id] = sorted(int(i) for i in rng.choice(g.size, n, replace=False))
    return out


@pytest.mark.parametrize("name", ["resnet20", "small_cnn", "vgg16_bn_cifar", "mobilenet_v2"])
def test_infer_removals_recovers_pare_surgery(name: str) -> None:
    """Round trip: pare's own surgery with random removals, then recovered from the two models alone."""
    model = _trained_like(name) if name != "mobilenet_v2" else create(name).eval()
    x = torch.randn(1, 1, 16, 16) if name == "small_cnn" else torch.randn(1, 3, 32, 32)
    graph = trace(model, x)
    removals = _random_removals(graph, np.random.default_rng(0))
    pruned = graph.prune(removals)
    before = copy.deepcopy(model.state_dict())
    _, found = infer_removals(model, pruned, x)
    assert found == removals
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_infer_removals_refuses_changed_weights() -> None:
    model = _trained_like("resnet20")
    x = torch.randn(1, 3, 32, 32)
    graph = trace(model, x)
    pruned = graph.prune({"layer1.0.conv1": [0, 3, 5]})
    with torch.no_grad():
        pruned.get_submodule("layer2.0.conv1").weight[0, 0, 0, 0] += 1.0
    with pytest.raises(PruneError, match=r"layer2\.0\.conv1"):
        infer_removals(model, pruned, x)


def test_infer_removals_refuses_a_different_model() -> None:
    x = torch.randn(1, 3, 32, 32)
    a, b = _trained_like("resnet20", 0), _trained_like("resnet20", 1)
    with pytest.raises(PruneError):
        infer_removals(a, trace(b, x).prune({"layer1.0.conv1": [1]}), x)


tp = pytest.importorskip("torch_pruning")


def test_torch_pruning_engine_budget_repair_and_no_mutation() -> None:
    """TP's pruned model hits the budget, leaves the input alone, and takes pare's compensation."""
    from pare.baselines.torch_pruning import prune_with_torch_pruning

    model = _trained_like("resnet20")
    x = torch.randn(1, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    pruned = prune_with_torch_pruning(model, x, criterion="l1", target=Budget(macs_reduction=0.4), tolerance=0.01)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    reduction = 1 - count(pruned, x).macs / count(model, x).macs
    assert abs(reduction - 0.4) <= 0.01
    graph, removals = infer_removals(model, pruned, x)
    # internal_only: only block-internal groups (the first conv of each block) lost channels
    assert removals and all(gid.endswith(".conv1") and gid.startswith("layer") for gid in removals)
    torch.manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    report = compensate(model, pruned, graph, removals, batches)
    assert report and all(v["after"] <= v["before"] + 1e-9 for v in report.values())


def test_torch_pruning_engine_errors() -> None:
    from pare.baselines.torch_pruning import prune_with_torch_pruning

    model, x = create("resnet20").eval(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="criterion"):
        prune_with_torch_pruning(model, x, criterion="chip", target=Budget(macs_reduction=0.3))
    with pytest.raises(ConfigError, match="data"):
        prune_with_torch_pruning(model, x, criterion="taylor", target=Budget(macs_reduction=0.3))
    with pytest.raises(BudgetError, match="sparsity"):
        prune_with_torch_pruning(model, x, target=Budget(sparsity="[0.]+[0.4]*9"))
