"""ISTA on BN scales (methods.md §2): acceptance checks §10.13-20."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pare
import pare.models
from pare.errors import ConfigError
from pare.methods.ista import (
    IstaHook,
    interior_difference,
    layer_lambdas,
    penalised_layers,
    prox_l1,
    remove_constant_channels,
    rescale_gamma,
    undo_rescale_gamma,
)


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine parameters (β both signs), so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=m.running_mean.dtype) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen, dtype=m.running_var.dtype) + 0.5)


class PlainNet(nn.Module):
    """conv0-bn0-relu -> conv1-bn1-relu -> conv2(+bias, no BN)-relu -> conv3: a (N, 5, 10, 10) feature map.

    bn0's consumer conv1 is followed by BN (fold into running_mean); bn1's consumer conv2 has a bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(6, 7, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(7)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(7, 8, 3, padding=1, bias=True)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu0(self.bn0(self.conv0(x)))
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.conv3(self.relu2(self.conv2(x)))


class ChainNet(nn.Module):
    """conv-bn-relu x2 -> GAP -> linear: the second BN is the last layer (feeds only the classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _plain(seed: int = 0) -> PlainNet:
    torch.manual_seed(seed)
    model = PlainNet().double().eval()
    _randomize_bn(model, seed)
    return model


X = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


# --- §10.13 prox step --------------------------------------------------------------------------------------------


def test_prox_matches_soft_threshold_and_gives_exact_zeros() -> None:
    g = torch.tensor([-0.5, -1e-4, 0.0, 1e-4, 0.5], dtype=torch.float64)
    eta, rho, lam = 0.1, 0.005, 1.28125
    t = eta * rho * lam
    out = prox_l1(g, t)
    ref = torch.sign(g) * torch.clamp(g.abs() - t, min=0.0)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    # The official algebraic form: g·max(0, 1 − t / max(|g|, 1e-16)).
    official = g * torch.clamp(1 - t / torch.clamp(g.abs(), min=1e-16), min=0.0)
    assert torch.allclose(out, official, rtol=0, atol=1e-12)
    small = g.abs() <= t
    assert small.tolist() == [False, True, True, True, False]
    assert (out[small] == 0).all() and not torch.signbit(out[small]).any()  # exact +0, never opposite sign
    assert torch.equal(torch.sign(out[~small]), torch.sign(g[~small]))
    assert float(out[0]) == pytest.approx(-0.5 + t, abs=1e-15)


# --- §10.14 scope of the prox --------------------------------------------------------------------------------------


def test_hook_uses_current_lr_and_touches_only_penalised_gamma() -> None:
    torch.manual_seed(0)
    model = ChainNet().double()
    graph = pare.trace(model, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    lambdas = layer_lambdas(model, graph, (8, 8))
    assert set(lambdas) == {"bn0", "bn1"}
    assert lambdas["bn1"] == 0.0  # last layer: feeds only the classifier
    assert lambdas["bn0"] > 0
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.3)
    rho = 0.7
    hook = IstaHook(model, rho, lambdas)
    for lr in (0.3, 0.03):  # changing the LR must change the threshold proportionally
        for o in (opt, opt_ref):
            for group in o.param_groups:
                group["lr"] = lr
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        before = model.bn0.weight.detach().clone()
        assert torch.equal(before, ref.bn0.weight.detach())
        hook.after_step(model, opt, lr=999.0)  # the trainer's lr argument is not used: the optimizer's is
        expected = prox_l1(before, lr * rho * lambdas["bn0"])
        assert torch.allclose(model.bn0.weight.detach(), expected, rtol=0, atol=1e-15)
        assert not torch.equal(model.bn0.weight.detach(), before)
        for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if name != "bn0.weight":
                assert torch.equal(p, q), name  # plain SGD update only (bn1: λ = 0 leaves γ untouched)
        with torch.no_grad():
            ref.bn0.weight.copy_(model.bn0.weight)


def test_hook_threshold_scales_with_lr() -> None:
    model = ChainNet().double()
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([0.5, -0.5, 0.01, 2.0], dtype=torch.float64))
    hook = IstaHook(model, 1.0, {"bn0": 1.0})
    drops = []
    for lr in (0.1, 0.2):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        hook.after_step(m, opt, lr)
        drops.append(float(model.bn0.weight[0].detach() - m.bn0.weight[0].detach()))
    assert drops[1] == pytest.approx(2 * drops[0], rel=1e-12)
    assert drops[0] == pytest.approx(0.1, rel=1e-12)


def test_faithful_variant_refuses_momentum() -> None:
    model = ChainNet()
    hook = IstaHook(model, 1e-3, {"bn0": 1.0})
    with pytest.raises(ConfigError, match="momentum"):
        hook.after_step(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 0.1)
    IstaHook(model, 1e-3, {"bn0": 1.0}, variant="momentum").after_step(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 0.1
    )
    with pytest.raises(ConfigError):
        IstaHook(model, 1e-3, {"fc": 1.0})


# --- §10.15 λ ----------------------------------------------------------------------------------------------------


def test_resnet20_lambdas() -> None:
    model = pare.models.create("resnet20").eval()
    graph = pare.trace(model, torch.randn(2, 3, 32, 32))
    lambdas = layer_lambdas(model, graph, (32, 32))
    # Only the first conv of each block is penalised (the official code gives only c0 a γ).
    assert penalised_layers(graph) == [f"layer{s}.{b}.bn1" for s in (1, 2, 3) for b in range(3)]
    assert lambdas["layer1.0.bn1"] == 1.28125
    assert lambdas["layer1.2.bn1"] == 1.28125
    assert lambdas["layer2.0.bn1"] == 0.671875


# --- §10.16 rescaling ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_rescale_gamma_preserves_outputs_and_undo_restores() -> None:
    torch.manual_seed(0)
    model = pare.models.create("resnet20").double().eval()
    _randomize_bn(model, 1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    graph = pare.trace(model, x)
    ref_out = model(x)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for alpha in (0.001, 0.01, 0.1, 1.0):
        rescale_gamma(model, alpha, graph)
        if alpha != 1.0:
            assert torch.allclose(model.layer1[0].bn1.weight, original["layer1.0.bn1.weight"] * alpha,
                                  rtol=1e-14, atol=0)
        assert float((model(x) - ref_out).abs().max()) <= 1e-10
        undo_rescale_gamma(model, alpha, graph)
        for k, v in model.state_dict().items():
            assert torch.allclose(v, original[k], rtol=1e-12, atol=1e-15), k
    # Negative control: γ alone (β ≠ 0) changes the function.
    with torch.no_grad():
        model.layer1[0].bn1.weight.mul_(0.1)
        model.layer1[0].conv2.weight.div_(0.1)
    assert float((model(x) - ref_out).abs().max()) > 1e-4


# --- §10.17-19 folding and recursive removal -------------------------------------------------------------------------


def test_constant_channel_folding_interior_equality() -> None:
    model = _plain()
    with torch.no_grad():
        model.bn0.weight[[1, 4]] = 0.0
        model.bn0.bias[[1, 4]] = torch.tensor([0.8, 1.3], dtype=torch.float64)  # ReLU(β) > 0: a real constant
        model.bn1.weight[[0, 5]] = 0.0
        model.bn1.bias[[0, 5]] = torch.tensor([0.6, 0.9], dtype=torch.float64)
    ref = model(X)
    running_mean = model.bn1.running_mean.clone()
    bias = model.conv2.bias.detach().clone()
    pruned, report = remove_constant_channels(model, X)
    assert report.constant == {"conv0": [1, 4], "conv1": [0, 5]}
    assert pruned.conv1.in_channels == 4 and pruned.conv2.in_channels == 5
    assert torch.equal(model.bn1.running_mean, running_mean)  # the input model is not modified
    # Folding went to the BN running mean of conv1 (BN consumer) and to conv2's bias (no BN).
    delta_bn = sum(float(b) * model.conv1.weight[:, j].sum(dim=(1, 2)) for j, b in ((1, 0.8), (4, 1.3)))
    assert torch.allclose(pruned.bn1.running_mean, running_mean[[1, 2, 3, 4, 6]] - delta_bn[[1, 2, 3, 4, 6]],
                          atol=1e-12)
    delta_bias = sum(float(b) * model.conv2.weight[:, j].sum(dim=(1, 2)) for j, b in ((0, 0.6), (5, 0.9)))
    assert torch.allclose(pruned.conv2.bias, bias + delta_bias, atol=1e-12)
    out = pruned(X)
    # conv1 is the folded consumer; conv1, conv2, conv3 are 3x3 with zero padding: 3 border pixels.
    interior, overall = interior_difference(out, ref, margin=3)
    print(f"folding: interior max |diff| = {interior:.3e}, whole-map max |diff| = {overall:.3e}")
    assert interior <= 1e-10
    assert overall > 1e-3  # the documented border effect is real


def test_nonpositive_beta_removal_is_exact_everywhere() -> None:
    model = _plain(1)
    with torch.no_grad():
        model.bn0.weight[[0, 2, 3]] = 0.0
        model.bn0.bias[[0, 2, 3]] = torch.tensor([-0.5, 0.0, -2.0], dtype=torch.float64)
    ref = model(X)
    pruned, report = remove_constant_channels(model, X)
    assert report.removals == {"conv0": [0, 2, 3]}
    interior, overall = interior_difference(pruned(X), ref, margin=0)
    assert overall <= 1e-12 and interior == overall


def test_recursive_removal_of_channels_whose_consumers_are_gone() -> None:
    model = _plain(2)
    with torch.no_grad():
        model.bn1.weight[[0, 1]] = 0.0  # filters 0, 1 of conv1 become constant and are removed ...
        model.conv1.weight[2:, 3] = 0.0  # ... and they were the only consumers of conv0's channel 3
    ref = model(X)
    pruned, report = remove_constant_channels(model, X)
    assert report.constant == {"conv1": [0, 1]}
    assert report.recursive == {"conv0": [3]}
    assert pruned.conv0.out_channels == 5 and pruned.conv1.in_channels == 5
    assert interior_difference(pruned(X), ref, margin=2)[0] <= 1e-10
    _, no_rec = remove_constant_channels(model, X, recursive=False)
    assert no_rec.removals == {"conv1": [0, 1]}


def test_residual_channels_never_removed() -> None:
    torch.manual_seed(0)
    model = pare.models.create("small_cnn", width=8).double().eval()
    _randomize_bn(model, 3)
    with torch.no_grad():
        model.bn1.weight[[0, 1]] = 0.0  # stem: part of the residual sum with conv3
        model.bn3.weight[[2]] = 0.0
        model.bn2.weight[[4]] = 0.0  # internal channel: removable
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    pruned, report = remove_constant_channels(model, x)
    assert report.removals == {"conv2": [4]}
    assert "residual" in report.skipped["conv1"]
    assert pruned.conv1.out_channels == 8 and pruned.conv3.out_channels == 8 and pruned.conv2.out_channels == 7

    net = pare.models.create("resnet20").double().eval()
    _randomize_bn(net, 4)
    with torch.no_grad():
        net.layer1[0].bn2.weight[:3] = 0.0
        net.layer2[1].bn1.weight[5] = 0.0
    pruned20, rep20 = remove_constant_channels(net, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert rep20.removals == {"layer2.1.conv1": [5]}
    assert pruned20.layer1[0].conv2.out_channels == 16


def test_ista_training_reaches_exact_zeros_and_removal() -> None:
    """End to end through the trainer: sparsify with the prox, then remove the constant channels."""
    from pare.train import fit, get_recipe

    torch.manual_seed(0)
    model = ChainNet()
    with torch.no_grad():
        model.bn0.weight.copy_(torch.tensor([0.1, 0.2, 1.0, 2.0]))  # two small scales the prox can zero
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 3, 8, 8, generator=gen)
    ys = torch.randint(0, 3, (64,), generator=gen)
    batches = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
    graph = pare.trace(model, xs[:2])
    hook = IstaHook(model, rho=0.3, lambdas=layer_lambdas(model, graph, (8, 8)))
    recipe = get_recipe("cifar-standard").replace(epochs=2, lr=0.1, momentum=0.0, weight_decay=0.0,
                                                  schedule="constant", batch_size=16)
    fit(model, batches, batches[:1], recipe, hooks=[hook], progress=False)
    zeros = int((model.bn0.weight == 0).sum())
    assert zeros == 2 and bool((model.bn0.weight[2:] != 0).all())
    assert hook.fake_sparsity(model) > 0
    model.eval()
    pruned, report = remove_constant_channels(model, xs[:2])
    assert pruned.conv0.out_channels == 4 - zeros
    assert sorted(report.constant["conv0"]) == torch.nonzero(model.bn0.weight == 0).view(-1).tolist()
