"""DACP-style, reconstructed from the abstract (methods.md §5.2): acceptance checks §10.30-33."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import pare
import pare.methods.dacp as dacp
import pare.models
from pare.methods.dacp import DacpHook, connectivity_weights, dacp_penalty, dacp_removals


def test_penalty_matches_hand_computation() -> None:
    # Conv weight (K=2, C=2, 1, 1): F0 = (1, 0), F1 = (1, 1); C0 = (1, 1), C1 = (0, 1).
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64).view(2, 2, 1, 1)
    eps = 0.0 + 1e-300  # negligible: the hand values use exact norms
    a, b = connectivity_weights(w, eps)
    c = 1 / math.sqrt(2)  # cos(F0, F1) = cos(C0, C1) = 1/sqrt(2)
    assert torch.allclose(a, torch.tensor([1 + c, 1 + c], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(b, torch.tensor([1 + c, 1 + c], dtype=torch.float64), atol=1e-12)
    lgl, lang = 0.3, 0.7
    expected = lgl * ((1 + c) * (1 + math.sqrt(2)) * 2) + lang * (0.5 + 0.5)
    got = dacp_penalty(w, a, b, lgl, lang, eps)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    # A 3-filter case with unequal weights: F = e1, e2, e1 + e2 (C = 2, 1x1).
    w3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64).view(3, 2, 1, 1)
    a3, b3 = connectivity_weights(w3, eps)
    assert torch.allclose(a3, torch.tensor([1 + c / 2, 1 + c / 2, 1 + c], dtype=torch.float64), atol=1e-12)
    # Input slices C0 = (1, 0, 1), C1 = (0, 1, 1): cos = 1/2, so b = 1 + 1/2.
    assert torch.allclose(b3, torch.tensor([1.5, 1.5], dtype=torch.float64), atol=1e-12)
    gl = (1 + c / 2) * 1 + (1 + c / 2) * 1 + (1 + c) * math.sqrt(2) + 1.5 * math.sqrt(2) * 2
    ang = (0.0 + 0.5 + 0.5) + 0.25
    assert float(dacp_penalty(w3, a3, b3, 1.0, 1.0, eps)) == pytest.approx(gl + ang, rel=1e-12)


def test_zero_group_gives_finite_penalty_and_gradient() -> None:
    w = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    w[1] = torch.randn(2, 3, 3, dtype=torch.float64)
    w.requires_grad_(True)
    a, b = connectivity_weights(w, 1e-8)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    p = dacp_penalty(w, a, b, 1e-4, 1e-4, 1e-8)
    p.backward()
    assert torch.isfinite(p) and torch.isfinite(w.grad).all()
    assert torch.equal(w.grad[0], torch.zeros_like(w.grad[0]))  # the zero filter gets a zero (finite) gradient


def test_connectivity_weights_detached_and_refreshed_once_per_epoch() -> None:
    torch.manual_seed(0)
    model = pare.models.create("small_cnn", width=4)
    hook = DacpHook(1e-3, 1e-3)
    hook.on_epoch_start(model, 0)
    a0 = {k: v[0].clone() for k, v in hook.weights.items()}
    assert all(not v[0].requires_grad and not v[1].requires_grad for v in hook.weights.values())
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # steps inside the epoch change the weights but not a, b
        opt.zero_grad()
        loss = hook.on_loss(model, nn.functional.cross_entropy(model(x), y), (x, y))
        loss.backward()
        opt.step()
        assert all(torch.equal(hook.weights[k][0], a0[k]) for k in a0)
    # The penalty's gradient flows only through the norms and cosines, not through a, b.
    loss_only = hook.penalty(model)
    assert loss_only.requires_grad
    resumed = DacpHook(1e-3, 1e-3)
    resumed.load_state_dict(copy.deepcopy(hook.state_dict()))
    resumed.on_epoch_start(model, 0)  # resuming inside epoch 0 keeps the stored weights
    assert all(torch.equal(resumed.weights[k][0], a0[k]) for k in a0)
    hook.on_epoch_start(model, 1)
    fresh = connectivity_weights(model.conv2.weight, hook.eps)[0]
    assert torch.equal(hook.weights["conv2"][0], fresh)
    assert not torch.equal(hook.weights["conv2"][0], a0["conv2"])


def test_hook_adds_penalty_to_loss() -> None:
    torch.manual_seed(0)
    model = pare.models.create("small_cnn", width=4)
    hook = DacpHook(1e-2, 1e-2, layers=["conv2"])
    base = torch.tensor(1.0)
    a, b = connectivity_weights(model.conv2.weight, hook.eps)
    expected = dacp_penalty(model.conv2.weight, a, b, 1e-2, 1e-2, hook.eps)
    assert torch.allclose(hook.on_loss(model, base, None), base + expected)


def test_pruning_threshold_relative_to_layer_max() -> None:
    torch.manual_seed(0)
    model = pare.models.create("small_cnn", width=4).eval()
    with torch.no_grad():
        model.conv2.weight[1] *= 1e-4  # norm far below 1e-3 x max
        model.conv2.weight[3] *= 0.5
    graph = pare.trace(model, torch.randn(1, 1, 8, 8))
    sel = dacp_removals(graph, model, eps_rel=1e-3)
    norms = sel.norms["conv2"]
    assert np.allclose(norms, model.conv2.weight.detach().flatten(1).norm(dim=1).numpy(), rtol=1e-6)
    assert sel.removals == {"conv2": [1]}
    assert "reconstructed from the abstract" in sel.label
    graph.prune(sel.removals, verify=True)
    budget = dacp_removals(graph, model, budget=0.25)
    total = sum(n.size for n in budget.norms.values())
    assert sum(len(v) for v in budget.removals.values()) == int(0.25 * total)
    assert 1 in budget.removals["conv2"]


def test_labelling() -> None:
    for text in (dacp.__doc__, DacpHook.__doc__, dacp.SUMMARY, dacp.EVIDENCE, dacp.LABEL, DacpHook(0, 0).label):
        assert text is not None and "reconstructed from the abstract" in text
