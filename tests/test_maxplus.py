"""Max-plus filter selection (methods.md §3): acceptance checks §10.21-25 and the paper's MNIST setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pare.errors import ConfigError
from pare.methods.maxplus import (
    MaxPlus,
    active_filters_counting,
    active_filters_threshold,
    export_maxout,
    mask_maxplus,
    prune_maxplus_inputs,
    replace_head_with_maxplus,
)
from tests.conftest import shared_path


class DenseMaxPlus(nn.Module):
    """The official tutorial shape: 784 -> Linear(hidden, no bias) -> MaxPlus(10) (input (N, 1, 28, 28))."""

    def __init__(self, hidden: int = 64, init: str = "zeros") -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden, bias=False)
        self.head = MaxPlus(hidden, 10, init=init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_forward_equals_brute_force_and_gradient_at_argmax_only() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = MaxPlus(5, 3, init="trunc_normal").double()
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    brute = torch.empty(4, 3, dtype=torch.float64)
    arg = np.zeros((4, 3), dtype=np.int64)
    for n in range(4):
        for j in range(3):
            vals = [float(x[n, i].detach() + layer.weight[i, j].detach()) for i in range(5)]
            brute[n, j] = max(vals)
            arg[n, j] = int(np.argmax(vals))
    assert torch.equal(y.detach(), brute)
    assert np.array_equal(layer.argmax(x.detach()).numpy(), arg)
    for n in range(4):
        for j in range(3):
            gx, gw = torch.autograd.grad(y[n, j], (x, layer.weight), retain_graph=True)
            one_hot_x = torch.zeros_like(x)
            one_hot_x[n, arg[n, j]] = 1.0
            one_hot_w = torch.zeros_like(layer.weight)
            one_hot_w[arg[n, j], j] = 1.0
            assert torch.equal(gx, one_hot_x) and torch.equal(gw, one_hot_w)


def test_rule_a_counting_on_hand_built_example() -> None:
    layer = MaxPlus(4, 2).double()  # zero weights: the argmax of each output is the argmax of x
    feats = torch.tensor(
        [
            [5.0, 1.0, 0.0, 0.0],  # class 0, argmax 0, predicted 0 (tie-free: y = max x for both classes)
            [4.0, 0.0, 0.0, 0.0],  # class 0, argmax 0
            [0.0, 3.0, 0.0, 0.0],  # class 0, argmax 1
            [0.0, 0.0, 7.0, 0.0],  # class 1, argmax 2
            [0.0, 0.0, 0.0, 6.0],  # class 1, argmax 3
            [0.0, 0.0, 0.0, 9.0],  # class 0, argmax 3 -- misclassified once weights are set below
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 0])
    with torch.no_grad():
        layer.weight[:, 1] = torch.tensor([-10.0, -10.0, 0.5, 0.5], dtype=torch.float64)
        layer.weight[:, 0] = torch.tensor([0.0, 0.0, 0.0, -0.1], dtype=torch.float64)
    # Predictions: sample 5 has y0 = 9 - 0.1 = 8.9 < y1 = 9.5, so it is misclassified and not counted.
    res = active_filters_counting(lambda f: f, layer, [(feats, labels)], ths_rate=0.0)
    assert res.n_per_class.tolist() == [3, 2]
    assert res.counts.tolist() == [[2, 1, 0, 0], [0, 0, 1, 1]]
    assert [p.tolist() for p in res.per_class] == [[0, 1], [2, 3]]
    assert res.kept.tolist() == [0, 1, 2, 3]
    every = active_filters_counting(lambda f: f, layer, [(feats, labels)], ths_rate=0.0, only_correct=False)
    assert every.n_per_class.tolist() == [4, 2] and every.counts[0].tolist() == [2, 1, 0, 1]
    # aᵢ > int(ths_rate·n_j): class 0 with ths 0.5 -> int(1.5) = 1, so only filter 0 (count 2) is active.
    strict = active_filters_counting(lambda f: f, layer, [(feats[:3], labels[:3])], ths_rate=0.5)
    assert [p.tolist() for p in strict.per_class] == [[0], []]
    assert strict.kept.tolist() == [0]
    # The reduced model removes columns of W1 (rows of fc1.weight) and rows of the max-plus W.
    torch.manual_seed(0)
    net = DenseMaxPlus(hidden=4).double()
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(4, 10, dtype=torch.float64))
    pruned = prune_maxplus_inputs(net, "head", [0, 2], torch.randn(2, 1, 28, 28, dtype=torch.float64))
    assert torch.equal(pruned.fc1.weight, net.fc1.weight[[0, 2]])
    assert torch.equal(pruned.head.weight, net.head.weight[[0, 2]])
    assert net.fc1.weight.shape == (4, 784) and net.head.weight.shape == (4, 10)  # the original is untouched


def test_rule_a_preserves_predictions_on_the_counting_set() -> None:
    torch.manual_seed(1)
    net = DenseMaxPlus(hidden=32).double()
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(32, 10, dtype=torch.float64))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 1, 28, 28, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        pred = net(x).argmax(1)
    labels = pred.clone()
    labels[::3] = (labels[::3] + 1) % 10  # a third is misclassified: those are not counted
    res = active_filters_counting(net.features, net.head, [(x[:150], labels[:150]), (x[150:], labels[150:])])
    assert 0 < res.kept.size < 32
    pruned = prune_maxplus_inputs(net, "head", res.kept.tolist(), x[:2])
    with torch.no_grad():
        new_pred = pruned(x).argmax(1)
    correct = pred == labels
    assert torch.equal(new_pred[correct], pred[correct])


def test_rule_b_threshold_and_guard() -> None:
    w = torch.tensor(
        [[1.0, -0.5, 0.2], [0.7, -0.3, 0.1], [0.5, -0.9, 0.12], [0.6, -2.0, 0.3]], dtype=torch.float64
    )
    plain = active_filters_threshold(w, tau=0.6, guarded=False)
    assert [p.tolist() for p in plain.per_class] == [[0, 1, 3], [], [0, 3]]  # class 1: max < 0 -> empty
    for j in (0, 2):
        col = w[:, j]
        assert plain.per_class[j].tolist() == [i for i in range(4) if col[i] >= 0.6 * col.max()]
    guarded = active_filters_threshold(w, tau=0.6)
    assert [p.tolist() for p in guarded.per_class[::2]] == [[0, 1, 3], [0, 3]]
    # Range-relative for class 1: min -2, max -0.3, threshold -2 + 0.6·1.7 = -0.98 -> filters 0, 1, 2.
    assert guarded.per_class[1].tolist() == [0, 1, 2]
    assert all(p.size >= 1 for p in guarded.per_class)
    assert guarded.kept.tolist() == [0, 1, 2, 3]


def test_maxout_export_equals_pruned_maxplus() -> None:
    torch.manual_seed(3)
    net = DenseMaxPlus(hidden=16).double()
    with torch.no_grad():
        net.head.weight.copy_(torch.randn(16, 10, dtype=torch.float64))
    z = torch.randn(20, 784, dtype=torch.float64)
    pruned = prune_maxplus_inputs(net, "head", [1, 4, 5, 9, 12], torch.randn(2, 1, 28, 28, dtype=torch.float64))
    head = export_maxout(pruned.fc1, pruned.head)
    with torch.no_grad():
        assert torch.allclose(head(z), pruned.head(pruned.fc1(z)), rtol=0, atol=1e-12)
    # Rule B: each class takes the max over its own kept filters (duplicates across classes).
    sel = active_filters_threshold(net.head.weight, tau=0.6)
    masked = DenseMaxPlus(hidden=16).double()
    masked.load_state_dict(net.state_dict())
    mask_maxplus(masked.head, sel.per_class)
    maxout = export_maxout(masked.fc1, masked.head, sel.per_class)
    assert maxout.weight.shape[0] == sum(p.size for p in sel.per_class)
    with torch.no_grad():
        assert torch.allclose(maxout(z), masked.head(masked.fc1(z)), rtol=0, atol=1e-12)


def test_replace_head_with_maxplus_on_a_cnn() -> None:
    import pare.models

    torch.manual_seed(0)
    model = pare.models.create("small_cnn", width=4).double().eval()
    layer = replace_head_with_maxplus(model, "linear")
    assert isinstance(model.linear, MaxPlus) and layer.weight.shape == (8, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 10, dtype=torch.float64))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    pruned = prune_maxplus_inputs(model, "linear", [0, 3, 5], x)
    assert pruned.conv4.out_channels == 3 and pruned.bn4.num_features == 3
    captured: list[torch.Tensor] = []
    handle = model.avgpool.register_forward_hook(lambda m, i, o: captured.append(torch.flatten(o, 1)))
    with torch.no_grad():
        model(x)
        handle.remove()
        feats = captured[0]  # the unpruned body's pooled features (N, 8)
        expected = (feats[:, [0, 3, 5]].unsqueeze(2) + layer.weight[[0, 3, 5]].unsqueeze(0)).amax(1)
        assert torch.allclose(pruned(x), expected, atol=1e-12)
    with pytest.raises(ConfigError, match=r"not nn\.Linear"):
        replace_head_with_maxplus(model, "conv1")


def test_paper_setting_mnist_dense_rule_a() -> None:
    """784 -> Dense(64, no bias) -> MaxPlus(10), Adam (LR 1e-3, 5 epochs) on a 6000-image MNIST subset, rule A with
    ths_rate 0 (methods.md §3.3 TF1 setting, shortened)."""
    from pare.data import load_dataset

    root = shared_path("data", "mnist")
    train = load_dataset(str(root), "train")
    test = load_dataset(str(root), "test")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train), generator=gen)[:6000]
    xtr = train.images[idx].float() / 255.0
    ytr = train.labels[idx]
    xte, yte = test.images.float() / 255.0, test.labels
    # Truncated-normal max-plus init (TF1 model): with the Keras zero init every class starts on the same argmax
    # and most filters never train (measured: 4/64 kept, 39% test accuracy).
    net = DenseMaxPlus(hidden=64, init="trunc_normal")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(5):
        order = torch.randperm(6000, generator=gen)
        for s in range(0, 6000, 128):
            b = order[s:s + 128]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc_before = float((net(xte).argmax(1) == yte).float().mean())
        pred_tr = net(xtr).argmax(1)
    res = active_filters_counting(net.features, net.head, [(xtr, ytr)], ths_rate=0.0)
    pruned = prune_maxplus_inputs(net, "head", res.kept.tolist(), xtr[:2])
    with torch.no_grad():
        acc_after = float((pruned(xte).argmax(1) == yte).float().mean())
        new_tr = pruned(xtr).argmax(1)
    correct = pred_tr == ytr
    print(f"max-plus MNIST: {res.kept.size}/64 filters kept; test acc {acc_before:.4f} -> {acc_after:.4f}; "
          f"counting set {int(correct.sum())} correctly classified of 6000")
    assert torch.equal(new_tr[correct], pred_tr[correct])
    assert acc_before > 0.7  # a short run on a subset; the check is that pruning preserves predictions
    assert res.kept.size < 64
