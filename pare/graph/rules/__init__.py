"""Operator rules: how each operator moves channels (analysis) and how it changes when channels go (rebuild).

One registry (:mod:`pare.graph.rules.registry`) holds every operator spec; the families register theirs on import:
:mod:`~pare.graph.rules.producers` (conv, linear), :mod:`~pare.graph.rules.norms` (batch/instance/group norm,
PReLU, FrozenBatchNorm2d, LayerNorm), :mod:`~pare.graph.rules.elementwise` (activations, dropout, pooling,
arithmetic, reductions) and :mod:`~pare.graph.rules.shape` (cat, split, slicing, pad, reshape, permute). Anything
else is opaque: the channels it touches are frozen.
"""

from pare.graph.rules import elementwise, norms, producers, shape  # registration on import
from pare.graph.rules.base import (
    CONST,
    DYNAMIC,
    ZERO,
    Context,
    FunctionRebuild,
    FunctionResult,
    FunctionRule,
    Kept,
    ModuleRule,
    Use,
    Value,
    clone_module,
    flat_nodes,
    set_param,
    slice_param,
    unshare,
)
from pare.graph.rules.elementwise import PER_CHANNEL_FUNCTIONS, PER_CHANNEL_MODULES, PassthroughRule
from pare.graph.rules.norms import LayerNormRule, PerChannelRule
from pare.graph.rules.producers import ConvRule, LinearRule
from pare.graph.rules.registry import (
    FUNCTIONS,
    MODULE_RULES,
    FunctionSpec,
    function_rebuild,
    function_rule,
    module_rule,
    register_function,
    register_module,
)

_flat_nodes = flat_nodes  # the name pare.allocate.strategies uses

__all__ = [
    "CONST", "DYNAMIC", "FUNCTIONS", "MODULE_RULES", "PER_CHANNEL_FUNCTIONS", "PER_CHANNEL_MODULES", "ZERO",
    "Context", "ConvRule", "FunctionRebuild", "FunctionResult", "FunctionRule", "FunctionSpec", "Kept",
    "LayerNormRule", "LinearRule", "ModuleRule", "PassthroughRule", "PerChannelRule", "Use", "Value",
    "clone_module", "elementwise", "flat_nodes", "function_rebuild", "function_rule", "module_rule", "norms",
    "producers", "register_function", "register_module", "set_param", "shape", "slice_param",
    "unshare",
]
