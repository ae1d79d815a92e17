"""Network Slimming (methods.md §6.1): acceptance check §10.35."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import pare
import pare.models
from pare.methods.slimming import SlimmingHook, channel_gammas, slimming_removals


def test_subgradient_adds_exactly_s_sign_gamma() -> None:
    torch.manual_seed(0)
    model = pare.models.create("small_cnn", width=4).double()
    with torch.no_grad():
        model.bn2.weight.copy_(torch.tensor([0.5, -0.25, 0.0, 2.0], dtype=torch.float64))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    s = 1e-4
    SlimmingHook(s).after_backward(model)
    for name, p in model.named_parameters():
        if name.startswith("bn") and name.endswith("weight"):
            assert torch.equal(p.grad, grads[name] + s * torch.sign(p.detach())), name
        else:
            assert torch.equal(p.grad, grads[name]), name  # only BN scales are touched
    diff = model.bn2.weight.grad - grads["bn2.weight"]
    assert torch.allclose(diff, torch.tensor([s, -s, 0.0, s], dtype=torch.float64), rtol=0, atol=1e-15)


def test_hook_before_step_changes_the_sgd_update() -> None:
    torch.manual_seed(1)
    model = pare.models.create("small_cnn", width=4)
    gamma0 = model.bn1.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # isolate the penalty: zero task gradient
    SlimmingHook(0.1, layers=["bn1"]).after_backward(model)
    opt.step()
    assert torch.allclose(model.bn1.weight.detach(), gamma0 - 0.5 * 0.1 * torch.sign(gamma0))
    assert torch.equal(model.bn2.weight.detach(), torch.ones(4))


def test_global_threshold_is_percent_quantile() -> None:
    torch.manual_seed(0)
    model = pare.models.create("resnet20").eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
    graph = pare.trace(model, torch.randn(1, 3, 32, 32))
    scores = channel_gammas(graph, model)
    # An internal group's score is its BN |γ|; a residual group's is the max |γ| over its coupled BNs.
    assert np.allclose(scores["layer1.0.conv1"], model.layer1[0].bn1.weight.detach().abs().numpy())
    # The stem group couples every block output of all stages (zero-pad shortcuts): 1 + 9 BatchNorms.
    bns = [m for m in graph.group("conv1").members if m.role == "norm" and m.param == "weight"]
    assert len(bns) == 10
    stem = np.max(np.stack([model.get_submodule(m.module).weight.detach().abs().numpy()[m.offset:m.offset + 16]
                            for m in bns]), axis=0)
    assert np.allclose(scores["conv1"], stem)
    percent = 0.4
    allv = np.sort(np.concatenate(list(scores.values())))
    threshold = allv[int(len(allv) * percent)]
    removals = slimming_removals(graph, model, percent)
    for gid, s in scores.items():
        expected = [i for i in range(s.size) if s[i] <= threshold]
        assert removals.get(gid, []) == expected, gid
    n_removed = sum(len(v) for v in removals.values())
    assert n_removed == int(np.sum(allv <= threshold))
    assert n_removed >= int(len(allv) * percent)
    pruned = graph.prune(removals, verify=True)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_never_removes_a_whole_group() -> None:
    model = pare.models.create("small_cnn", width=4).eval()
    with torch.no_grad():
        model.bn2.weight.copy_(torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]))
    graph = pare.trace(model, torch.randn(1, 1, 8, 8))
    removals = slimming_removals(graph, model, 0.5)
    assert removals["conv2"] == [0, 1, 2]  # all four are under the threshold; the largest is kept
    graph.prune(removals, verify=True)
