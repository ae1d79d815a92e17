"""The operator registry: one table of operator specs, looked up by module type or canonical function name.

A spec says how channels flow through the operator (``analyze``), how its parameters and arguments change when
channels go (``rebuild``) and what a removed (zero) channel becomes through it (``removed``, see
:mod:`pare.graph.rules.base`). The families (``producers``, ``norms``, ``elementwise``, ``shape``) register their
specs here when the package is imported; a user registers a custom layer with :func:`register_module` or
:func:`register_function` (docs/adding-an-operator.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from pare.graph import ops
from pare.graph.rules.base import FunctionRebuild, FunctionRule, ModuleRule

ModuleMatch = type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool]


@dataclass(frozen=True)
class FunctionSpec:
    """A ``call_function`` / ``call_method`` operator: its analysis and (optional) argument rebuild."""

    analyze: FunctionRule
    rebuild: FunctionRebuild | None = None


#: ``(match, rule)``: the first entry whose match accepts a module wins (a type, a tuple of types, or a predicate).
MODULE_RULES: list[tuple[ModuleMatch, ModuleRule]] = []
#: canonical operator name (:mod:`pare.graph.ops`) -> spec
FUNCTIONS: dict[str, FunctionSpec] = {}


def _matches(match: ModuleMatch, m: nn.Module) -> bool:
    if isinstance(match, (type, tuple)):
        return isinstance(m, match)
    return bool(match(m))


def register_module(match: ModuleMatch, rule: ModuleRule, *, first: bool = True) -> None:
    """Register ``rule`` for modules accepted by ``match`` (a type, tuple of types or predicate).

    ``first=True`` puts it before the built-in rules, so a custom subclass rule wins over its base class's. A module
    fx should not trace into must also be a leaf: see :data:`pare.graph.trace.LEAF_TYPES`.
    """
    entry = (match, rule)
    if first:
        MODULE_RULES.insert(0, entry)
    else:
        MODULE_RULES.append(entry)


def register_function(names: Iterable[str], analyze: FunctionRule, rebuild: FunctionRebuild | None = None) -> None:
    """Register a function/method rule under canonical names (``ops.canonical_name`` must know them)."""
    for name in names:
        FUNCTIONS[name] = FunctionSpec(analyze, rebuild)


def module_rule(m: nn.Module) -> ModuleRule | None:
    for match, rule in MODULE_RULES:
        if _matches(match, m):
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and m.return_indices:
                return None
            return rule
    return None


def function_rule(node: fx.Node) -> tuple[str | None, FunctionRule | None]:
    name = ops.canonical_name(node.op, node.target)
    spec = FUNCTIONS.get(name) if name else None
    return name, (spec.analyze if spec else None)


def function_rebuild(node: fx.Node) -> FunctionRebuild | None:
    name = ops.canonical_name(node.op, node.target)
    spec = FUNCTIONS.get(name) if name else None
    return spec.rebuild if spec else None
