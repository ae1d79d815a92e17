"""Build a module on the meta device quickly: parameters get shapes but no memory, and no initialisation runs.

``with torch.device("meta")`` alone sends every ``nn.init`` call through torch's Python reference kernels,
whose first use imports ``torch._dynamo`` (seconds per process). Initialising a meta tensor computes nothing,
so :func:`meta_init` skips those calls; only in-place operations that keep the tensor's shape are skipped
(this project's design).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_SHAPE_KEEPING_METHODS = frozenset(
    {"normal_", "uniform_", "fill_", "zero_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_", "copy_"}
)


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        initialiser = getattr(func, "__module__", "") == "torch.nn.init" or (
            getattr(func, "__name__", "") in _SHAPE_KEEPING_METHODS
        )
        if initialiser and isinstance(target, torch.Tensor) and target.is_meta:
            return target  # nothing to compute on a tensor without data; its shape is unchanged
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_init() -> Iterator[None]:
    """Context: modules created inside get meta tensors, without running their initialisers."""
    with torch.device("meta"), _SkipMetaInit():
        yield
