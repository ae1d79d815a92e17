"""Canonical operator names for fx ``call_function`` / ``call_method`` targets.

``x + y``, ``torch.add(x, y)``, ``x.add(y)`` and ``x.add_(y)`` all become ``"add"``, so one rule serves them all.
Targets are matched by identity against torch, torch.nn.functional, torch.Tensor and operator, never by a user
function's ``__name__`` (a user function called ``add`` is unknown, hence frozen).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

UNARY = {
    # activations
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu",
    "celu", "mish", "softplus", "softsign", "hardtanh", "logsigmoid", "tanhshrink", "threshold", "rrelu",
    # dropout
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    # per-channel spatial ops
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    # element-wise math
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "floor", "ceil", "round",
    "reciprocal", "sign", "clamp", "clip", "clamp_min", "clamp_max", "pow", "nan_to_num",
    # identity-like
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type", "type_as",
    "requires_grad_", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
}
BINARY = {
    "add", "sub", "rsub", "mul", "div", "truediv", "floordiv", "true_divide", "maximum", "minimum", "fmax", "fmin",
    "where", "masked_fill", "lerp", "addcmul", "addcdiv", "eq", "ne", "gt", "ge", "lt", "le", "logical_and",
    "logical_or", "atan2", "hypot",
}
RESHAPE = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as", "reshape_as"}
REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm"}
SPECIAL = {
    "cat", "concat", "concatenate", "split", "chunk", "narrow", "getitem", "pad", "permute", "transpose",
    "softmax", "log_softmax", "normalize", "max", "min", "size", "dim", "getattr", "stack",
}

_TABLE: dict[Any, str] = {}


def _register(name: str, *objects: Any) -> None:
    for obj in objects:
        if obj is not None:
            _TABLE.setdefault(obj, name)


for _name in sorted(UNARY | BINARY | RESHAPE | REDUCE | SPECIAL):
    for _base in (_name, _name + "_"):
        _register(_name, getattr(torch, _base, None), getattr(F, _base, None), getattr(torch.Tensor, _base, None))
for _op in ("add", "sub", "mul", "truediv", "floordiv", "neg", "getitem", "iadd", "isub", "imul", "itruediv"):
    _register(_op.removeprefix("i") if _op.startswith("i") and _op != "itruediv" else _op, getattr(operator, _op))
_register("truediv", operator.itruediv)
_register("getattr", getattr)
_register("div", torch.divide, torch.Tensor.divide)
_register("mul", torch.multiply, torch.Tensor.multiply)
_register("sub", torch.subtract, torch.Tensor.subtract)
_register("pad", torch.nn.functional.pad)


def canonical_name(op: str, target: Any) -> str | None:
    """The canonical name of a ``call_function`` / ``call_method`` target, or None if unknown."""
    if op == "call_method":
        name = str(target)
        if name.startswith("__r") and name.endswith("__"):
            name = name[3:-2]
            return "rsub" if name == "sub" else ("truediv" if name == "truediv" else name)
        name = name.strip("_")
        if name.startswith("i") and name[1:] in BINARY:
            name = name[1:]
        known = UNARY | BINARY | RESHAPE | REDUCE | SPECIAL
        return name if name in known else None
    if op == "call_function":
        try:
            return _TABLE.get(target)
        except TypeError:  # unhashable target
            return None
    return None
