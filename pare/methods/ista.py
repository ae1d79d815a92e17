"""ISTA on BatchNorm scales: Ye, Lu, Lin, Wang, "Rethinking the Smaller-Norm-Less-Informative Assumption in
Channel Pruning of Convolution Layers" (ICLR 2018, arXiv:1802.00124); methods.md §2.

Sparsity training: after each optimizer step, the penalised γ get the proximal (soft-threshold) step
``γ ← sign(g)·max(|g| − η·ρ·λₗ, 0)`` at the optimizer's current learning rate η, so that γ reaches exact zeros
(:class:`IstaHook`). λₗ is the per-channel memory cost of §2.2 (:func:`layer_lambdas`). Channels with γ == 0 are
then removed with their constant output folded into the consumers (:func:`remove_constant_channels`, from
:mod:`pare.methods.fold`, where the border effect of that folding is documented). The γ–W rescaling trick is
:func:`rescale_gamma` / :func:`undo_rescale_gamma`.

Only the internal channels of single-producer conv + BatchNorm groups are penalised; residual-sum channels never
are (the official code builds them without γ). For a CIFAR ResNet this is the first conv of each block.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pare.errors import ConfigError
from pare.graph import ChannelGraph
from pare.methods.fold import (
    ConstantRemoval,
    channel_constants,
    interior_difference,
    penalised_groups,
    remove_constant_channels,
)
from pare.train.hooks import Hook

__all__ = [
    "ConstantRemoval",
    "IstaHook",
    "interior_difference",
    "layer_lambdas",
    "penalised_layers",
    "prox_l1",
    "remove_constant_channels",
    "rescale_gamma",
    "undo_rescale_gamma",
]

VARIANTS = ("faithful", "momentum")


def prox_l1(g: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft threshold ``sign(g)·max(|g| − threshold, 0)``, any shape.

    Written as a ``where`` so that entries with ``|g| <= threshold`` are exactly +0.0, never a tiny value of
    opposite sign (the official ``g·max(0, 1 − t/max(|g|, 1e-16))`` form can round to one).
    """
    if threshold < 0:
        raise ConfigError(f"prox threshold must be >= 0, got {threshold}")
    return torch.where(g.abs() <= threshold, torch.zeros_like(g), g - torch.sign(g) * threshold)


def penalised_layers(graph: ChannelGraph) -> list[str]:
    """Paths of the BatchNorm modules whose γ ISTA penalises (see the module docstring), in graph order."""
    return [bn.module for _, bn in penalised_groups(graph)]


def layer_lambdas(model: nn.Module, graph: ChannelGraph, input_hw: tuple[int, int] = (32, 32)) -> dict[str, float]:
    """Per penalised BatchNorm path, Ye et al.'s "memory" weight λₗ (methods.md §2.2):

        λₗ = [Hₗ·Wₗ + kₕ·k_w·c_{l−1} + Σ_{consumers} kₕ'·k_w'·c_out'] / (I_h·I_w)

    ``Hₗ×Wₗ`` is the producer conv's output map for an input of ``input_hw`` (which is also ``I_h×I_w``), the
    second term the size of one filter, the third the consumers' weight slices per channel (for a Linear that
    reads a flattened map: ``stride·out_features``). λ = 0 for the last layer: [design] a layer none of whose
    consumers is a convolution (it feeds only the classifier), the counterpart of the official ``is_last``.
    """
    h, w = input_hw
    example = graph.example_inputs[0]
    shapes: dict[str, tuple[int, ...]] = {}
    groups = penalised_groups(graph)
    producers = {g.producers()[0].module for g, _ in groups}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda mod, inp, out, p=p: shapes.__setitem__(p, tuple(out.shape))
        )
        for p in producers
    ]
    was_training = model.training
    model.eval()  # a 1-sample forward in train mode would fail in BN for 1x1 maps and change running stats
    try:
        with torch.no_grad():
            model(torch.zeros((1, example.shape[1], h, w), dtype=example.dtype))
    finally:
        model.train(was_training)
        for hd in handles:
            hd.remove()
    lambdas: dict[str, float] = {}
    for g, bn in groups:
        prod = g.producers()[0]
        out_shape = shapes[prod.module]
        fmap = 1
        for s in out_shape[2:]:
            fmap *= int(s)
        weight = model.get_submodule(prod.module).weight
        own = weight.numel() // weight.shape[prod.dim]
        consumers = [m for m in g.members if m.role == "in"]
        cost = 0.0
        for m in consumers:
            cw = model.get_submodule(m.module).weight
            cost += cw.numel() // cw.shape[m.dim] * m.stride
        last = not any(isinstance(model.get_submodule(m.module), nn.modules.conv._ConvNd) for m in consumers)
        lambdas[bn.module] = 0.0 if last else (fmap + own + cost) / float(h * w)
    return lambdas


class IstaHook(Hook):
    """Trainer hook: the ISTA proximal step on the penalised γ after every optimizer step.

    ``lambdas``: BatchNorm path -> λₗ (from :func:`layer_lambdas`); only those γ are touched, every other
    parameter keeps the plain optimizer update. ``rho``: the global penalty ρ (official ``--l1_penalty``).
    The threshold is ``lr·ρ·λₗ`` with ``lr`` the *current* learning rate of the optimizer param group holding
    that γ, read at each step, so LR schedules scale it (methods.md §2.6).

    ``variant="faithful"`` is the official setting: plain SGD (momentum 0) on the smooth loss plus the prox;
    the hook refuses an optimizer with momentum. ``variant="momentum"`` allows any optimizer (momentum SGD,
    Adam) on the smooth part plus the prox on γ: common practice, not textbook ISTA, and labelled as a variant.
    """

    def __init__(self, model: nn.Module, rho: float, lambdas: Mapping[str, float], variant: str = "faithful"):
        if variant not in VARIANTS:
            raise ConfigError(f"unknown ISTA variant '{variant}'; choose from {', '.join(VARIANTS)}")
        if rho < 0:
            raise ConfigError(f"rho must be >= 0, got {rho}")
        self.rho = float(rho)
        self.variant = variant
        self.lambdas = {str(k): float(v) for k, v in lambdas.items()}
        for path, lam in self.lambdas.items():
            if lam < 0:
                raise ConfigError(f"lambda for '{path}' must be >= 0, got {lam}")
            if not isinstance(model.get_submodule(path), _BatchNorm):
                raise ConfigError(f"'{path}' is not a BatchNorm module")
        self.label = "ISTA on BN scales (Ye et al. 2018)" + (
            "" if variant == "faithful" else ", momentum variant (not textbook ISTA)"
        )

    def _lr_of(self, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
        for group in optimizer.param_groups:
            if any(p is param for p in group["params"]):
                if self.variant == "faithful" and group.get("momentum", 0.0) != 0.0:
                    raise ConfigError("variant='faithful' needs plain SGD (momentum 0); use variant='momentum'")
                if self.variant == "faithful" and not isinstance(optimizer, torch.optim.SGD):
                    raise ConfigError("variant='faithful' needs torch.optim.SGD; use variant='momentum'")
                return float(group["lr"])
        raise ConfigError("a penalised γ is not in the optimizer")

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float | None = None) -> None:
        """Apply the prox to every penalised γ (in place). ``lr`` from the trainer is ignored in favour of the
        optimizer's own current LR for γ's param group (identical under pare's trainer)."""
        with torch.no_grad():
            for path, lam in self.lambdas.items():
                gamma = model.get_submodule(path).weight
                threshold = self._lr_of(optimizer, gamma) * self.rho * lam
                gamma.copy_(prox_l1(gamma, threshold))

    def fake_sparsity(self, model: nn.Module) -> float:
        """The λ-weighted fraction of penalised γ that are exactly 0 (the official log's "fake sparsity")."""
        total = zero = 0.0
        for path, lam in self.lambdas.items():
            gamma = model.get_submodule(path).weight.detach()
            total += lam * gamma.numel()
            zero += lam * float((gamma == 0).sum())
        return zero / total if total > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "variant": self.variant, "lambdas": dict(self.lambdas)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rho = float(state["rho"])
        self.variant = str(state["variant"])
        self.lambdas = {str(k): float(v) for k, v in state["lambdas"].items()}


def rescale_gamma(model: nn.Module, alpha: float, graph: ChannelGraph, layers: Iterable[str] | None = None) -> None:
    """The γ–W rescaling trick (methods.md §2.2), in place: for each penalised BatchNorm (or those in
    ``layers``), (γ, β) → (αγ, αβ) and each consumer's weight slice on those channels W' → W'/α.

    β is scaled too: the activations between the BN and the consumers must be positively homogeneous (ReLU,
    LeakyReLU, pools), so that act(α·z) = α·act(z) and the network function is preserved exactly; a PruneError
    is raised otherwise. ``graph`` must be traced from ``model``. ``alpha`` > 0.
    """
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    wanted = set(layers) if layers is not None else None
    for g, bn in penalised_groups(graph):
        if wanted is not None and bn.module not in wanted:
            continue
        channel_constants(graph, g, bn, homogeneous_only=True)  # raises if an activation is not homogeneous
        with torch.no_grad():
            bn_mod = model.get_submodule(bn.module)
            sl = slice(bn.offset, bn.offset + g.size * bn.stride)
            bn_mod.weight[sl] *= alpha
            bn_mod.bias[sl] *= alpha
            for m in g.members:
                if m.role == "in":
                    w = model.get_submodule(m.module).weight
                    w.narrow(m.dim, m.offset, g.size * m.stride).div_(alpha)


def undo_rescale_gamma(model: nn.Module, alpha: float, graph: ChannelGraph,
                       layers: Iterable[str] | None = None) -> None:
    """Undo :func:`rescale_gamma` (rescale by 1/α); restores the parameters up to floating-point rounding."""
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    rescale_gamma(model, 1.0 / alpha, graph, layers)
