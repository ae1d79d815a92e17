"""Torch-Pruning (Fang et al., CVPR 2023; ``torch_pruning`` 1.6) as a pruning engine of pare's pipeline.

Benchmarks and users who compare pare with Torch-Pruning (TP) need TP's pruned model under the same budget, the
same allocation family, the same rounding and the same block-internal restriction as pare's, and then the same
repair. This module prunes with TP's own ``MetaPruner`` and importance classes, and maps pare's options onto TP's:

* ``allocation="uniform"``: TP's per-layer pruning ratio (``global_pruning=False``); ``"global"``: TP's global
  ranking (``global_pruning=True``);
* ``internal_only``: every conv/linear that does not produce one of pare's block-internal groups is in TP's
  ``ignored_layers`` (so TP prunes exactly the groups pare's ``internal_only`` allows);
* ``round_to``: TP's ``round_to``;
* a MACs or parameter budget: TP has none, so its ``pruning_ratio`` is bisected until pare's own counter gives the
  target within ``tolerance`` (the same counter and convention pare's budget search uses).

The input model is never modified. ``torch_pruning`` is an optional dependency (the ``bench`` extra).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pare.allocate.budget import Budget
from pare.allocate.strategies import Constraints, eligible_groups, producer_modules
from pare.count import count
from pare.errors import BudgetError, ConfigError
from pare.graph import trace

IMPORTANCES = ("l1", "l2", "fpgm", "taylor", "random")
Batch = tuple[torch.Tensor, torch.Tensor]


def _importance(tp: object, criterion: str) -> object:
    imp = tp.importance  # type: ignore[attr-defined]
    makers: dict[str, Callable[[], object]] = {
        "l1": lambda: imp.MagnitudeImportance(p=1),
        "l2": lambda: imp.MagnitudeImportance(p=2),
        "fpgm": lambda: imp.FPGMImportance(),
        "taylor": lambda: imp.TaylorImportance(),
        "random": lambda: imp.RandomImportance(),
    }
    if criterion not in makers:
        raise ConfigError(f"Torch-Pruning criterion '{criterion}' is not mapped; choose from {', '.join(IMPORTANCES)}")
    return makers[criterion]()


def _ignored(model: nn.Module, example_inputs: torch.Tensor, internal_only: bool) -> list[nn.Module]:
    """Modules whose output channels TP must keep: all but the producers of pare's eligible groups."""
    graph = trace(model, example_inputs)
    allowed = {p for g in eligible_groups(graph, Constraints(internal_only=internal_only))
               for p in producer_modules(graph, g)}
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [m for name, m in model.named_modules() if isinstance(m, layers) and name not in allowed]


def prune_with_torch_pruning(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    criterion: str = "l1",
    target: Budget,
    round_to: int = 1,
    allocation: str = "uniform",
    internal_only: bool = True,
    data: Sequence[Batch] | None = None,
    seed: int = 0,
    tolerance: float = 0.005,
    convention: str = "macs",
) -> nn.Module:
    """Prune a copy of ``model`` with Torch-Pruning to ``target`` and return it (``model`` is not modified).

    Args:
        model: the dense model; example_inputs: e.g. ``torch.randn(1, 3, 32, 32)``.
        criterion: TP importance: "l1"/"l2" (``MagnitudeImportance``), "fpgm", "taylor" (needs ``data``), "random".
        target: a :class:`pare.Budget` with ``macs_reduction``, ``params_reduction`` or ``channel_ratio`` (the
            last is TP's ``pruning_ratio`` itself).
        round_to: TP's ``round_to`` (kept channel counts are multiples of it).
        allocation: "uniform" (per-layer ratio) or "global" (TP's global ranking).
        internal_only: restrict TP to pare's block-internal groups (see the module docstring).
        data: calibration batches ``(images, labels)``; Taylor's gradients are accumulated over all of them.
        seed: seeds torch's global generator for TP's random importance (TP draws from it).
        tolerance: allowed distance of the reached MACs/params reduction from the target (a fraction).
        convention: pare's counting convention for the target ("macs" or "chip").

    Raises:
        ConfigError: torch_pruning is not installed, an unknown criterion or allocation, Taylor without data.
        BudgetError: a sparsity budget, or no ratio reaches the target within ``tolerance``.
    """
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise ConfigError("engine 'torch-pruning' needs the torch-pruning package (pip install 'pare[bench]')") \
            from exc
    if allocation not in ("uniform", "global"):
        raise ConfigError(f"Torch-Pruning allocation must be 'uniform' or 'global', got '{allocation}'")
    if criterion == "taylor" and not data:
        raise ConfigError("Torch-Pruning's taylor importance needs calibration data")
    if target.kind == "sparsity":
        raise BudgetError("Torch-Pruning takes no sparsity strings; give a MACs, params or channel budget")
    base = copy.deepcopy(model).eval()
    ignored = _ignored(base, example_inputs, internal_only)
    names = {id(m): n for n, m in base.named_modules()}
    dense = count(base, example_inputs, convention)

    def run(ratio: float) -> nn.Module:
        pruned = copy.deepcopy(base)
        keep = [pruned.get_submodule(names[id(m)]) for m in ignored]
        pruner = tp.pruner.MetaPruner(pruned, example_inputs, importance=_importance(tp, criterion),
                                      pruning_ratio=ratio, ignored_layers=keep, round_to=round_to,
                                      global_pruning=allocation == "global")
        if criterion == "taylor":
            pruned.zero_grad()
            for images, labels in data or ():
                nn.functional.cross_entropy(pruned(images), labels).backward()
        torch.manual_seed(seed)
        pruner.step()
        pruned.zero_grad(set_to_none=True)
        return pruned

    if target.kind == "channel_ratio":
        return run(float(target.value))
    metric = "macs" if target.kind == "macs_reduction" else "params"
    goal = float(target.value)

    def reduction(m: nn.Module) -> float:
        c = count(m, example_inputs, convention)
        return 1.0 - (c.macs / dense.macs if metric == "macs" else c.params / dense.params)

    lo, hi = 0.0, 0.99
    best: tuple[nn.Module, float] | None = None
    for _ in range(20):
        mid = (lo + hi) / 2
        pruned = run(mid)
        got = reduction(pruned)
        if best is None or abs(got - goal) < abs(best[1] - goal):
            best = (pruned, got)
        if abs(got - goal) <= tolerance:
            break
        lo, hi = (mid, hi) if got < goal else (lo, mid)
    if best is None or abs(best[1] - goal) > tolerance:
        closest = f"{best[1]:.4f}" if best else "none"
        raise BudgetError(f"Torch-Pruning cannot reach a {metric} reduction of {goal:.4f} within {tolerance} "
                          f"(closest {closest})")
    return best[0]
