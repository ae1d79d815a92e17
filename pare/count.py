"""MACs / parameter counter with explicit, named conventions (methods.md §7.1).

One forward pass in eval mode under ``no_grad`` with forward hooks on every leaf module, plus a
``TorchFunctionMode`` that counts tensor additions/subtractions/multiplications/divisions and catches
functional convolutions or linears that are not inside a conv/linear module. All figures are exact integers
**per image** (totals divided by the batch size).

Conventions for the headline :attr:`Counts.macs`:

* ``"macs"``: conv + linear multiply-accumulates (the papers' "FLOPs"). Conv MACs are ``out_elems * (c_in /
  groups) * prod(kernel)``; transposed conv MACs are ``in_elems * (c_out / groups) * prod(kernel)`` (each
  input element is scattered through the kernel); Linear MACs are ``in_features * out_elems``. Biases are not
  counted.
* ``"chip"``: the CHIP / HRankPlus README convention (thop with BN counted at 2 ops per element): conv +
  linear MACs + conv-bias additions (one per conv output element) + 2 x BN output elements.

Figures under different conventions must never be compared; :meth:`Counts.reduction_vs` refuses to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from pare.errors import ConfigError

CONVENTIONS: tuple[str, ...] = ("macs", "chip")

# Method / function names (as TorchFunctionMode reports them) of the element-wise arithmetic that is counted.
_ELEMENTWISE_NAMES = frozenset(
    {
        "add", "add_", "__add__", "__iadd__", "__radd__",
        "sub", "sub_", "__sub__", "__isub__", "__rsub__", "rsub", "subtract", "subtract_",
        "mul", "mul_", "__mul__", "__imul__", "__rmul__", "multiply", "multiply_",
        "div", "div_", "__truediv__", "__itruediv__", "__rtruediv__", "__rdiv__", "__div__",
        "true_divide", "true_divide_", "divide", "divide_",
    }
)  # fmt: skip

_FUNCTIONAL_CONVS: dict[Callable[..., Any], bool] = {
    F.conv1d: False,
    F.conv2d: False,
    F.conv3d: False,
    F.conv_transpose1d: True,
    F.conv_transpose2d: True,
    F.conv_transpose3d: True,
}


@dataclass(frozen=True)
class LayerCount:
    """One leaf-module call (or one functional conv/linear outside a module).

    ``output_shape`` is per image (batch dimension dropped); ``macs`` and ``bn_elements`` are per image;
    ``params`` are the module's own parameters (0 for functional calls, whose weights may not be parameters).
    ``kind`` is ``"conv"`` (incl. transposed), ``"linear"``, ``"bn"`` or ``"other"``.
    """

    path: str
    type: str
    kind: str
    in_channels: int | None
    out_channels: int | None
    output_shape: tuple[int, ...]
    macs: int
    bias_adds: int
    bn_elements: int
    params: int


@dataclass(frozen=True)
class Counts:
    """Exact per-image counts of one model at one input size, under one headline convention."""

    conv_macs: int
    linear_macs: int
    conv_bias_adds: int
    bn_elements: int
    elementwise_ops: int
    params: int
    params_no_bn_affine: int
    convention: str
    layers: tuple[LayerCount, ...]

    @property
    def macs(self) -> int:
        """Headline count under :attr:`convention` (see the module docstring)."""
        if self.convention == "macs":
            return self.conv_macs + self.linear_macs
        if self.convention == "chip":
            return self.conv_macs + self.linear_macs + self.conv_bias_adds + 2 * self.bn_elements
        raise ConfigError(f"unknown counting convention {self.convention!r}; expected one of {CONVENTIONS}")

    def reduction_vs(self, base: Counts) -> dict[str, float | int | str]:
        """Reductions of this (pruned) model against ``base``, computed from the absolute counts.

        Returns ``macs``/``params``/``params_no_bn_affine`` reductions as fractions in ``[0, 1]``
        (negative when this model is larger), the ``speedup`` ``base.macs / self.macs``, the absolute
        counts and the convention.
        Raises :class:`ConfigError` when the two were counted under different conventions (methods.md §10.6).
        """
        if not isinstance(base, Counts):
            raise ConfigError(f"reduction_vs needs a Counts baseline, got {type(base).__name__}")
        if base.convention != self.convention:
            raise ConfigError(
                f"cannot compare counts under different conventions: pruned {self.convention!r} vs "
                f"baseline {base.convention!r}; recount both with one convention"
            )
        if base.macs <= 0 or base.params <= 0 or base.params_no_bn_affine <= 0:
            raise ConfigError("baseline counts must be positive to compute reductions")
        return {
            "convention": self.convention,
            "macs_base": base.macs,
            "macs": self.macs,
            "macs_reduction": 1.0 - self.macs / base.macs,
            "speedup": base.macs / self.macs if self.macs > 0 else math.inf,
            "params_base": base.params,
            "params": self.params,
            "params_reduction": 1.0 - self.params / base.params,
            "params_no_bn_affine_base": base.params_no_bn_affine,
            "params_no_bn_affine": self.params_no_bn_affine,
            "params_no_bn_affine_reduction": 1.0 - self.params_no_bn_affine / base.params_no_bn_affine,
        }

    def to_dict(self, include_layers: bool = False) -> dict[str, Any]:
        """Plain dict (JSON-ready) of the counts, with the headline ``macs``; layers only on request."""
        record: dict[str, Any] = {
            "convention": self.convention,
            "macs": self.macs,
            "conv_macs": self.conv_macs,
            "linear_macs": self.linear_macs,
            "conv_bias_adds": self.conv_bias_adds,
            "bn_elements": self.bn_elements,
            "elementwise_ops": self.elementwise_ops,
            "params": self.params,
            "params_no_bn_affine": self.params_no_bn_affine,
        }
        if include_layers:
            record["layers"] = [asdict(layer) for layer in self.layers]
        return record


class _Tally:
    """Mutable running totals (whole batch) while the forward runs."""

    def __init__(self) -> None:
        self.records: list[LayerCount] = []
        self.elementwise_total = 0
        # >0 while inside a conv/linear module, whose own functional call is already counted by its hook.
        self.inside_counted_module = 0


class _ElementwiseMode(TorchFunctionMode):
    """Counts element-wise arithmetic by output numel, and conv/linear calls outside conv/linear modules."""

    def __init__(self, tally: _Tally, batch_size: int) -> None:
        super().__init__()
        self.tally = tally
        self.batch_size = batch_size

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _ELEMENTWISE_NAMES and isinstance(out, torch.Tensor):
            self.tally.elementwise_total += out.numel()
        elif self.tally.inside_counted_module == 0 and isinstance(out, torch.Tensor):
            if func in _FUNCTIONAL_CONVS:
                self.tally.records.append(
                    _functional_conv_record(name, args, kwargs, out, _FUNCTIONAL_CONVS[func], self.batch_size)
                )
            elif func is F.linear:
                self.tally.records.append(_functional_linear_record(args, kwargs, out, self.batch_size))
        return out


def _per_image(total: int, batch_size: int, what: str) -> int:
    if total % batch_size != 0:
        raise ConfigError(f"{what}: {total} elements do not split evenly over a batch of {batch_size}")
    return total // batch_size


def _shape_per_image(out: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(size) for size in out.shape[1:])


def _functional_conv_record(
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: torch.Tensor,
    transposed: bool,
    batch_size: int,
) -> LayerCount:
    inp = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    kernel_elems = math.prod(int(size) for size in weight.shape[2:])
    if transposed:
        # Weight (c_in, c_out / groups, k...): every input element meets c_out / groups * k weights.
        macs_total = inp.numel() * int(weight.shape[1]) * kernel_elems
        in_channels, out_channels = int(weight.shape[0]), int(out.shape[1])
    else:
        macs_total = out.numel() * int(weight.shape[1]) * kernel_elems
        in_channels, out_channels = int(inp.shape[1]), int(weight.shape[0])
    bias_total = out.numel() if bias is not None else 0
    return LayerCount(
        path=f"<functional {name}>",
        type=name,
        kind="conv",
        in_channels=in_channels,
        out_channels=out_channels,
        output_shape=_shape_per_image(out),
        macs=_per_image(macs_total, batch_size, name),
        bias_adds=_per_image(bias_total, batch_size, name),
        bn_elements=0,
        params=0,
    )


def _functional_linear_record(
    args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor, batch_size: int
) -> LayerCount:
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return LayerCount(
        path="<functional linear>",
        type="linear",
        kind="linear",
        in_channels=int(weight.shape[1]),
        out_channels=int(weight.shape[0]),
        output_shape=_shape_per_image(out),
        macs=_per_image(out.numel() * int(weight.shape[1]), batch_size, "linear"),
        bias_adds=0,
        bn_elements=0,
        params=0,
    )


def _module_record(
    path: str, module: nn.Module, inp: tuple[Any, ...], out: Any, batch_size: int
) -> LayerCount:
    """Per-image record of one call of a leaf module."""
    own_params = sum(parameter.numel() for parameter in module.parameters(recurse=False))
    type_name = type(module).__name__
    label = path or type_name
    in_channels: int | None = None
    out_channels: int | None = None
    macs_total = bias_total = bn_total = 0
    kind = "other"
    out_tensor = out if isinstance(out, torch.Tensor) else None
    if isinstance(module, nn.modules.conv._ConvNd) and out_tensor is not None:
        kind = "conv"
        in_channels, out_channels = module.in_channels, module.out_channels
        kernel_elems = math.prod(module.kernel_size)
        if module.transposed:
            macs_total = inp[0].numel() * (module.out_channels // module.groups) * kernel_elems
        else:
            macs_total = out_tensor.numel() * (module.in_channels // module.groups) * kernel_elems
        if module.bias is not None:
            bias_total = out_tensor.numel()
    elif isinstance(module, nn.Linear) and out_tensor is not None:
        kind = "linear"
        in_channels, out_channels = module.in_features, module.out_features
        macs_total = out_tensor.numel() * module.in_features
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and out_tensor is not None:
        kind = "bn"
        in_channels = out_channels = module.num_features
        bn_total = out_tensor.numel()
    return LayerCount(
        path=label,
        type=type_name,
        kind=kind,
        in_channels=in_channels,
        out_channels=out_channels,
        output_shape=_shape_per_image(out_tensor) if out_tensor is not None else (),
        macs=_per_image(macs_total, batch_size, label),
        bias_adds=_per_image(bias_total, batch_size, label),
        bn_elements=_per_image(bn_total, batch_size, label),
        params=own_params,
    )


def _batch_size(inputs: tuple[Any, ...]) -> int:
    for item in inputs:
        if isinstance(item, torch.Tensor):
            if item.dim() == 0 or item.shape[0] < 1:
                raise ConfigError(f"example input of shape {tuple(item.shape)} has no batch dimension")
            return int(item.shape[0])
    raise ConfigError("count() needs at least one example input tensor (batch dimension first)")


def count(
    model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...], convention: str = "macs"
) -> Counts:
    """Count MACs, BN elements, element-wise ops and parameters of ``model`` on ``example_inputs``.

    Args:
        model: any ``nn.Module``; its per-module training flags are restored afterwards.
        example_inputs: a tensor (N, ...) or a tuple of positional inputs whose first tensor has the batch
            dimension first. Figures are per image: totals divided by N.
        convention: ``"macs"`` (conv + linear MACs) or ``"chip"`` (methods.md §7.1); sets :attr:`Counts.macs`.

    Returns:
        :class:`Counts` with exact integers. ``params`` counts every distinct parameter of the model;
        ``params_no_bn_affine`` excludes the BatchNorm weight and bias.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown counting convention {convention!r}; expected one of {CONVENTIONS}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    batch_size = _batch_size(inputs)
    tally = _Tally()
    handles: list[RemovableHandle] = []
    counted_types = (nn.modules.conv._ConvNd, nn.Linear)
    for path, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue

        def hook(mod: nn.Module, inp: tuple[Any, ...], out: Any, path: str = path) -> None:
            if isinstance(mod, counted_types):
                tally.inside_counted_module -= 1
            tally.records.append(_module_record(path, mod, inp, out, batch_size))

        if isinstance(module, counted_types):

            def pre_hook(mod: nn.Module, inp: tuple[Any, ...]) -> None:
                tally.inside_counted_module += 1

            handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(hook))

    training_flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _ElementwiseMode(tally, batch_size):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag

    conv_macs = linear_macs = bias_adds = bn_elements = 0
    for record in tally.records:
        if record.kind == "linear":
            linear_macs += record.macs
        elif record.kind == "conv":
            conv_macs += record.macs
        bias_adds += record.bias_adds
        bn_elements += record.bn_elements
    params = 0
    bn_affine = 0
    seen: set[int] = set()
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            params += parameter.numel()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                bn_affine += parameter.numel()
    return Counts(
        conv_macs=conv_macs,
        linear_macs=linear_macs,
        conv_bias_adds=bias_adds,
        bn_elements=bn_elements,
        # Element-wise ops on tensors without a batch dimension are rare; floor keeps the figure an integer.
        elementwise_ops=tally.elementwise_total // batch_size,
        params=params,
        params_no_bn_affine=params - bn_affine,
        convention=convention,
        layers=tuple(tally.records),
    )
