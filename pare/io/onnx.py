"""ONNX export of (pruned) models, written atomically.

Two exporters ship with torch 2.13: the TorchScript-based one (``dynamo=False``; deprecated but present) and
the ``torch.export``-based one (``dynamo=True``, uses onnxscript). Measured here (torch 2.13 CPU, onnxscript
0.7): the TorchScript exporter honours the requested opset exactly and takes ~0.1 s for a small CNN; the
dynamo exporter takes seconds, writes opset 18 when 17 is asked for (onnx has no Pad down-converter) and needs
``external_data=False`` to produce a single file. ``exporter="auto"`` therefore tries TorchScript first and
falls back to dynamo when it fails (or is removed in a later torch).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.checks import first_nonfinite_tensor
from pare.errors import ConfigError, ExportError, PareError
from pare.io._atomic import atomic_path, fsync_file

_EXPORTERS = ("auto", "torchscript", "dynamo")



def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ConfigError("export_onnx: example_inputs must be a tensor or a non-empty sequence of tensors")
    return inputs


def _export_torchscript(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int, dynamic_batch: bool
) -> None:
    input_names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    dynamic_axes = {name: {0: "batch"} for name in input_names} if dynamic_batch else None
    with warnings.catch_warnings():
        # The exporter warns that it is deprecated and about constant folding of strided slices; neither
        # matters.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=["output"],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _export_dynamo(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int, dynamic_batch: bool
) -> None:
    dynamic_shapes: Any = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    # The exporter prints progress, version-conversion tracebacks and log warnings even when it succeeds.
    sink = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes, verbose=False
            )
            if program is None:
                raise ExportError("dynamo exporter returned no program")
            program.save(str(path), external_data=False)
    finally:
        onnx_logger.setLevel(level)
    written = _default_opset(path)
    if written is not None and written != opset:
        warnings.warn(f"dynamo ONNX exporter wrote opset {written}, not the requested {opset}", stacklevel=3)


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    exporter: str = "auto",
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` (in eval mode) to a single ``.onnx`` file, atomically; return the path.

    Args:
        model: any module, including ``torch.fx.GraphModule`` and models with ``ZeroPadShortcut``. It is
            exported in eval mode; every module's training flag is restored afterwards.
        example_inputs: one tensor (N, ...) or a sequence of tensors used to trace the model.
        path: destination file; its directory must exist.
        opset: ONNX opset requested (the dynamo exporter may write a newer one, see module docstring).
        exporter: ``"auto"`` (TorchScript, then dynamo on failure), ``"torchscript"`` or ``"dynamo"``.
        dynamic_batch: make dimension 0 of every input (and so of the output) symbolic.

    Raises:
        ExportError: every exporter tried failed (the message names each failure), or the model has NaN/infinite
            weights (the first such tensor is named).
        ConfigError: bad ``exporter`` or ``example_inputs``.
    """
    if exporter not in _EXPORTERS:
        raise ConfigError(f"export_onnx: exporter must be one of {', '.join(_EXPORTERS)}, got {exporter!r}")
    bad = first_nonfinite_tensor(model)
    if bad is not None:
        raise ExportError(f"{path}: not exported: the model has non-finite weights (NaN or infinity), first in '{bad}'")
    inputs = _as_tuple(example_inputs)
    chain = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[
        exporter
    ]
    functions = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}
    target = Path(path)
    flags = [(module, module.training) for module in model.modules()]
    failures: list[str] = []
    model.eval()
    try:
        for name in chain:
            try:
                with atomic_path(target) as tmp:
                    functions[name](model, inputs, tmp, opset, dynamic_batch)
                    _check_onnx(tmp)
                    fsync_file(tmp)
                return target
            except PareError as exc:
                if isinstance(exc, ExportError):
                    failures.append(f"{name}: {exc}")
                    continue
                raise
            except (
                Exception
            ) as exc:  # exporters raise many types (RuntimeError, UnsupportedOperatorError, ...)
                failures.append(f"{name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    finally:
        for module, training in flags:
            module.training = training
    raise ExportError(f"{target}: ONNX export failed ({'; '.join(failures)})")


def _default_opset(path: Path) -> int | None:
    """Opset of the default ONNX domain in the file, or None when the onnx package is absent."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _check_onnx(path: Path) -> None:
    """Validate the written model with ``onnx.checker`` when the onnx package is installed."""
    try:
        import onnx
    except ImportError:
        return
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported model fails onnx.checker: {' '.join(str(exc).split())[:300]}") from None
