"""Loading third-party state dicts into zoo models with exact key and shape checks.

akamaster/pytorch_resnet_cifar10 checkpoints are ``{"best_prec1": float, "state_dict": {...}}`` saved from a
``DataParallel`` model (every key prefixed ``module.``) by a PyTorch older than 0.4.1, so BatchNorm's
``num_batches_tracked`` buffers are absent. :func:`load_state_dict_compat` strips the prefix, requires every
other key to match exactly, and leaves absent ``num_batches_tracked`` buffers at the model's current value (0
for a fresh model). That buffer only matters for BatchNorm with ``momentum=None`` (cumulative averaging) in
training mode; no zoo model uses that, and eval-mode outputs never depend on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pare.errors import CheckpointError

_OPTIONAL_SUFFIX = "num_batches_tracked"


def load_state_dict_compat(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state_dict"
) -> list[str]:
    """Copy ``state_dict`` into ``model``; return the ``num_batches_tracked`` keys that were absent.

    Accepts a bare state dict or a checkpoint dict with a ``"state_dict"`` entry, with or without a
    ``module.`` prefix on every key. Raises :class:`CheckpointError` (naming ``source`` and the keys) on
    unexpected keys, missing keys other than ``num_batches_tracked``, or shape mismatches.
    """
    if (
        isinstance(state_dict, Mapping)
        and "state_dict" in state_dict
        and isinstance(state_dict["state_dict"], Mapping)
    ):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a mapping of tensors, got {type(state_dict).__name__}")
    keys = list(state_dict)
    if keys and all(key.startswith("module.") for key in keys):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    expected = model.state_dict()
    unexpected = [key for key in state_dict if key not in expected]
    missing = [key for key in expected if key not in state_dict]
    missing_required = [key for key in missing if not key.endswith(_OPTIONAL_SUFFIX)]
    if unexpected or missing_required:
        parts = []
        if missing_required:
            parts.append(f"missing {len(missing_required)} keys (first: {', '.join(missing_required[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (first: {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: does not match {type(model).__name__}: {'; '.join(parts)}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    # Complete the dict with the model's own num_batches_tracked values so the strict load below can run.
    completed = dict(state_dict)
    for key in missing:
        completed[key] = expected[key]
    model.load_state_dict(completed, strict=True)
    return missing


def load_checkpoint_file(model: nn.Module, path: str | Path) -> list[str]:
    """``torch.load(path, weights_only=True)`` then :func:`load_state_dict_compat`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for corrupt or unsafe files
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({error})"
        ) from error
    return load_state_dict_compat(model, loaded, source=str(path))
