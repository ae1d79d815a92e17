"""Allowlist of leaf module types an artifact may rebuild, with the constructor arguments read from each
module.

A leaf is described as ``{"type": "Conv2d", "args": {...}}``; ``build_leaf`` only ever instantiates a class
from this table (exact type match, so a user subclass with a different ``forward`` is never mistaken for its
base).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from pare.errors import CheckpointError
from pare.layers import ZeroPadShortcut

JsonValue = Any  # JSON scalars and (nested) lists after encoding


def _bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
_CONV_T = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_MAXPOOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_INPLACE = ("inplace",)
_DROPOUT = ("p", "inplace")

# type -> (plain attribute names that equal constructor keywords, computed keywords)
_SPECS: dict[type[nn.Module], tuple[tuple[str, ...], dict[str, Callable[[nn.Module], Any]]]] = {
    nn.Conv1d: ((*_CONV, "padding_mode"), {"bias": _bias}),
    nn.Conv2d: ((*_CONV, "padding_mode"), {"bias": _bias}),
    nn.Conv3d: ((*_CONV, "padding_mode"), {"bias": _bias}),
    nn.ConvTranspose1d: ((*_CONV_T, "dilation", "padding_mode"), {"bias": _bias}),
    nn.ConvTranspose2d: ((*_CONV_T, "dilation", "padding_mode"), {"bias": _bias}),
    nn.ConvTranspose3d: ((*_CONV_T, "dilation", "padding_mode"), {"bias": _bias}),
    nn.Linear: (("in_features", "out_features"), {"bias": _bias}),
    nn.Bilinear: (("in1_features", "in2_features", "out_features"), {"bias": _bias}),
    nn.Embedding: (
        (
            "num_embeddings",
            "embedding_dim",
            "padding_idx",
            "max_norm",
            "norm_type",
            "scale_grad_by_freq",
            "sparse",
        ),
        {},
    ),
    nn.BatchNorm1d: (_NORM, {}),
    nn.BatchNorm2d: (_NORM, {}),
    nn.BatchNorm3d: (_NORM, {}),
    nn.InstanceNorm1d: (_NORM, {}),
    nn.InstanceNorm2d: (_NORM, {}),
    nn.InstanceNorm3d: (_NORM, {}),
    nn.GroupNorm: (("num_groups", "num_channels", "eps", "affine"), {}),
    nn.LayerNorm: (("normalized_shape", "eps", "elementwise_affine"), {"bias": _bias}),
    nn.LocalResponseNorm: (("size", "alpha", "beta", "k"), {}),
    nn.PReLU: (("num_parameters",), {}),
    nn.ReLU: (_INPLACE, {}),
    nn.ReLU6: (_INPLACE, {}),
    nn.SELU: (_INPLACE, {}),
    nn.SiLU: (_INPLACE, {}),
    nn.Mish: (_INPLACE, {}),
    nn.Hardswish: (_INPLACE, {}),
    nn.Hardsigmoid: (_INPLACE, {}),
    nn.ELU: (("alpha", "inplace"), {}),
    nn.CELU: (("alpha", "inplace"), {}),
    nn.LeakyReLU: (("negative_slope", "inplace"), {}),
    nn.RReLU: (("lower", "upper", "inplace"), {}),
    nn.Hardtanh: (("min_val", "max_val", "inplace"), {}),
    nn.Threshold: (("threshold", "value", "inplace"), {}),
    nn.GELU: (("approximate",), {}),
    nn.Softplus: (("beta", "threshold"), {}),
    nn.Hardshrink: (("lambd",), {}),
    nn.Softshrink: (("lambd",), {}),
    nn.GLU: (("dim",), {}),
    nn.Softmax: (("dim",), {}),
    nn.LogSoftmax: (("dim",), {}),
    nn.Softmin: (("dim",), {}),
    nn.Sigmoid: ((), {}),
    nn.Tanh: ((), {}),
    nn.LogSigmoid: ((), {}),
    nn.Softsign: ((), {}),
    nn.Tanhshrink: ((), {}),
    nn.Identity: ((), {}),
    nn.Dropout: (_DROPOUT, {}),
    nn.Dropout1d: (_DROPOUT, {}),
    nn.Dropout2d: (_DROPOUT, {}),
    nn.Dropout3d: (_DROPOUT, {}),
    nn.AlphaDropout: (_DROPOUT, {}),
    nn.FeatureAlphaDropout: (_DROPOUT, {}),
    nn.MaxPool1d: (_MAXPOOL, {}),
    nn.MaxPool2d: (_MAXPOOL, {}),
    nn.MaxPool3d: (_MAXPOOL, {}),
    nn.AvgPool1d: (("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"), {}),
    nn.AvgPool2d: (
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        {},
    ),
    nn.AvgPool3d: (
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        {},
    ),
    nn.LPPool1d: (("norm_type", "kernel_size", "stride", "ceil_mode"), {}),
    nn.LPPool2d: (("norm_type", "kernel_size", "stride", "ceil_mode"), {}),
    nn.AdaptiveAvgPool1d: (("output_size",), {}),
    nn.AdaptiveAvgPool2d: (("output_size",), {}),
    nn.AdaptiveAvgPool3d: (("output_size",), {}),
    nn.AdaptiveMaxPool1d: (("output_size", "return_indices"), {}),
    nn.AdaptiveMaxPool2d: (("output_size", "return_indices"), {}),
    nn.AdaptiveMaxPool3d: (("output_size", "return_indices"), {}),
    nn.Flatten: (("start_dim", "end_dim"), {}),
    nn.Unflatten: (("dim", "unflattened_size"), {}),
    nn.Upsample: (("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"), {}),
    nn.UpsamplingNearest2d: (("size", "scale_factor"), {}),
    nn.UpsamplingBilinear2d: (("size", "scale_factor"), {}),
    nn.PixelShuffle: (("upscale_factor",), {}),
    nn.PixelUnshuffle: (("downscale_factor",), {}),
    nn.ChannelShuffle: (("groups",), {}),
    nn.ZeroPad1d: (("padding",), {}),
    nn.ZeroPad2d: (("padding",), {}),
    nn.ZeroPad3d: (("padding",), {}),
    nn.ConstantPad1d: (("padding", "value"), {}),
    nn.ConstantPad2d: (("padding", "value"), {}),
    nn.ConstantPad3d: (("padding", "value"), {}),
    nn.ReflectionPad1d: (("padding",), {}),
    nn.ReflectionPad2d: (("padding",), {}),
    nn.ReflectionPad3d: (("padding",), {}),
    nn.ReplicationPad1d: (("padding",), {}),
    nn.ReplicationPad2d: (("padding",), {}),
    nn.ReplicationPad3d: (("padding",), {}),
    nn.CircularPad1d: (("padding",), {}),
    nn.CircularPad2d: (("padding",), {}),
    nn.CircularPad3d: (("padding",), {}),
    ZeroPadShortcut: (("pad_front", "pad_back", "stride"), {}),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _SPECS[nn.RMSNorm] = (("normalized_shape", "eps", "elementwise_affine"), {})

LEAF_TYPES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in _SPECS}


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, used to name (not to import) types the allowlist does not cover."""
    return f"{cls.__module__}.{cls.__qualname__}"


def is_supported_leaf(module: nn.Module) -> bool:
    """True when ``module`` is childless and its exact type is in the allowlist."""
    return type(module) in _SPECS and not any(True for _ in module.children())


def _to_json(value: Any, where: str) -> JsonValue:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_to_json(item, where) for item in value]
    raise CheckpointError(f"{where}: constructor argument of type {type(value).__name__} cannot be stored")


def _from_json(value: JsonValue) -> Any:
    # Constructors take tuples (kernel_size, padding, normalized_shape, ...); lists came from JSON.
    if isinstance(value, list):
        return tuple(_from_json(item) for item in value)
    return value


def describe_leaf(module: nn.Module, path: str) -> dict[str, Any]:
    """``{"type": name, "args": {...}}`` of an allowlisted leaf; the args rebuild a same-shaped module."""
    plain, computed = _SPECS[type(module)]
    where = f"module '{path}' ({type(module).__name__})"
    args: dict[str, Any] = {name: _to_json(getattr(module, name), where) for name in plain}
    args.update({name: getter(module) for name, getter in computed.items()})
    return {"type": type(module).__name__, "args": args}


def build_leaf(desc: Any, path: str) -> nn.Module:
    """Instantiate an allowlisted leaf from its description (call under :func:`pare.io._meta.meta_init`)."""
    if (
        not isinstance(desc, dict)
        or not isinstance(desc.get("type"), str)
        or not isinstance(desc.get("args"), dict)
    ):
        raise CheckpointError(f"artifact spec: leaf '{path}' is malformed: {str(desc)[:120]}")
    cls = LEAF_TYPES.get(desc["type"])
    if cls is None:
        raise CheckpointError(
            f"artifact spec: leaf '{path}' has type '{desc['type']}', which is not allowlisted"
        )
    plain, computed = _SPECS[cls]
    expected = set(plain) | set(computed)
    if set(desc["args"]) != expected:
        raise CheckpointError(
            f"artifact spec: leaf '{path}' ({desc['type']}) has arguments {sorted(desc['args'])}, "
            f"expected {sorted(expected)}"
        )
    kwargs = {name: _from_json(value) for name, value in desc["args"].items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"artifact spec: cannot build leaf '{path}' ({desc['type']}): {exc}") from None
