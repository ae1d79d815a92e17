"""Soft filter pruning (FPGM / SFP), methods.md §6.1 and §10 check 36.

Check 36: the score is Σ_j ‖F_i − F_j‖₂ and the ``rate_dist``·C smallest are zeroed; masks are recomputed each
epoch so a zeroed filter can regrow; the cosine option really uses cosine distance. The FPGM score function
itself is also checked in tests/test_criteria.py::test_fpgm_formula_and_cosine; here the hook's selection,
zeroing, regrowth and the final hard pruning are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pare
from pare.errors import ConfigError
from pare.methods.soft_prune import SoftPruneHook, soft_scores
from pare.train import Recipe, fit
from pare.train.hooks import Hook

X = torch.randn(1, 3, 8, 8)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # The second conv has no padding, so folding a constant channel into it has no border effect (exact).
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 10, 3, padding=0, bias=False), nn.BatchNorm2d(10), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 2),
    )


def filters(model: nn.Module, path: str) -> torch.Tensor:
    w = model.get_submodule(path).weight.detach()
    return w.reshape(w.shape[0], -1).double()


def zero_rows(model: nn.Module, path: str) -> list[int]:
    return [i for i, row in enumerate(filters(model, path)) if bool((row == 0).all())]


def test_scores_match_hand_loops_and_lowest_are_selected() -> None:
    model = make_model()
    hook = SoftPruneHook(pare.trace(model, X), 0.4)
    assert sorted(g.id for g in hook.groups) == ["0", "3"]
    f = filters(model, "0")
    loops = np.array([sum(float((f[i] - f[j]).norm()) for j in range(8)) for i in range(8)])
    np.testing.assert_allclose(soft_scores(f, "fpgm").numpy(), loops, rtol=1e-12)
    np.testing.assert_allclose(soft_scores(f, "l1").numpy(), f.abs().sum(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(soft_scores(f, "l2").numpy(), f.norm(dim=1).numpy(), rtol=1e-12)
    selected = hook.select(model)
    assert selected["0"] == sorted(np.argsort(loops)[: int(8 * 0.4)].tolist())


def test_apply_zeroes_rate_times_c_filters_and_nothing_else() -> None:
    model = make_model()
    before = {p: filters(model, p).clone() for p in ("0", "3")}
    hook = SoftPruneHook(pare.trace(model, X), 0.45)
    masks = hook.apply(model)
    for path, c in (("0", 8), ("3", 10)):
        assert len(masks[path]) == int(c * 0.45)  # 3 of 8, 4 of 10: floor, as the official code
        assert zero_rows(model, path) == masks[path]
        kept = [i for i in range(c) if i not in masks[path]]
        assert torch.equal(filters(model, path)[kept], before[path][kept])
    assert SoftPruneHook(pare.trace(model, X), 0.99).count(hook.groups[0]) == 7  # never the whole layer


def test_masks_are_recomputed_so_a_zeroed_filter_can_regrow() -> None:
    model = make_model()
    hook = SoftPruneHook(pare.trace(model, X), 0.25, groups=["0"])
    first = hook.apply(model)["0"]
    regrown = first[0]
    with torch.no_grad():  # what training can do: the zeroed filter becomes far from all others
        model[0].weight[regrown] = 5.0
    second = hook.apply(model)["0"]
    assert regrown not in second and len(second) == len(first) == 2
    assert bool((model[0].weight[regrown] == 5.0).all())  # not re-zeroed: masks do not accumulate
    assert hook.history == [{"0": first}, {"0": second}]


def test_zeroed_filters_keep_training_inside_fit(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 8, 8, generator=gen)
    labels = (images[:, 0].mean(dim=(1, 2)) > 0).long()
    train = DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(images[:32], labels[:32]), batch_size=32)
    model = make_model()
    with torch.no_grad():
        # As in a trained network, BN shifts of both signs. A zeroed filter outputs the constant β after its BN;
        # with β <= 0 the ReLU blocks its gradient and it stays zero, with β > 0 it receives updates.
        model[1].bias.copy_(torch.linspace(-0.4, 0.4, 8))
    hook = SoftPruneHook(pare.trace(model, X), 0.5)
    seen: list[list[int]] = []

    class Probe(Hook):
        # Runs before the soft-pruning hook's on_epoch_end: the state right after an epoch of training.
        def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
            seen.append(zero_rows(model, "0"))

    recipe = Recipe(name="t", epochs=3, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.0, schedule="constant")
    fit(model, train, val, recipe, hooks=[Probe(), hook], out_dir=tmp_path, progress=False)
    assert len(hook.history) == 4  # the start mask + one per epoch end
    for before, after in zip(hook.history[:-1], seen, strict=True):
        # Filters zeroed at the previous mask and no longer zero after an epoch of training: they regrew.
        regrew = set(before["0"]) - set(after)
        assert regrew
    assert zero_rows(model, "0") == hook.masks["0"] and len(hook.masks["0"]) == 4
    # Resume state round-trips.
    other = SoftPruneHook(pare.trace(make_model(), X), 0.5)
    other.load_state_dict(hook.state_dict())
    assert other.history == hook.history and other.masks == hook.masks


def test_cosine_option_is_really_cosine() -> None:
    model = make_model()
    with torch.no_grad():
        # Filter 0 is a scaled copy of filter 1: cosine distance 0 between them, euclidean distance large.
        model[0].weight[0] = 20.0 * model[0].weight[1]
    euclid = SoftPruneHook(pare.trace(model, X), 0.125, groups=["0"]).select(model)["0"]
    cosine = SoftPruneHook(pare.trace(model, X), 0.125, groups=["0"], distance="cosine").select(model)["0"]
    f = filters(model, "0")
    unit = f / f.norm(dim=1, keepdim=True)
    cos_loops = np.array([sum(1.0 - float(unit[i] @ unit[j]) for j in range(8) if j != i) for i in range(8)])
    assert cosine == [int(np.argmin(cos_loops))]
    assert euclid != [0]  # the scaled filter is far from everything in euclidean distance
    # Scale invariance: multiplying the selected filter of an untied model by 3 keeps the cosine choice.
    plain = make_model()
    chosen = SoftPruneHook(pare.trace(plain, X), 0.125, groups=["0"], distance="cosine").select(plain)["0"]
    with torch.no_grad():
        plain[0].weight[chosen[0]] *= 3.0
    again = SoftPruneHook(pare.trace(plain, X), 0.125, groups=["0"], distance="cosine").select(plain)["0"]
    assert again == chosen


def test_finalize_removes_zeroed_channels_and_keeps_the_function() -> None:
    model = make_model()
    model.train()
    with torch.no_grad():  # non-trivial BN statistics and shifts
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8))
        for bn in (model[1], model[4]):
            bn.bias.uniform_(-0.5, 0.5)
    model.eval()
    hook = SoftPruneHook(pare.trace(model, X), 0.5)
    hook.apply(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        masked = model(x)
    pruned, removals = hook.finalize(model, X)
    assert {k: len(v) for k, v in removals.items()} == {"0": 4, "3": 5}
    assert pruned[0].out_channels == 4 and pruned[3].in_channels == 4 and pruned[3].out_channels == 5
    assert pruned[8].in_features == 5
    pruned.eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked, rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
    graph = pare.trace(make_model(), X)
    for kwargs in ({"rate": 1.0}, {"rate": -0.1}, {"rate": 0.3, "score": "hrank"},
                   {"rate": 0.3, "distance": "manhattan"}):
        with pytest.raises(ConfigError):
            SoftPruneHook(graph, **kwargs)
    with pytest.raises(ConfigError, match="cannot be soft-pruned"):
        SoftPruneHook(graph, 0.3, groups=["8"])
