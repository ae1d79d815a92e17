"""Load third-party and pare checkpoints into an existing model, safely and strictly.

Supported layouts: akamaster ``.th`` files (``{'state_dict': {'module.conv1.weight': ...}, 'best_prec1':
...}``), torchvision-style ``.pth`` state dicts, plain state dicts, dicts that wrap the state dict under
``'model'``, ``'state_dict'`` or ``'model_state_dict'``, safetensors files and pare artifacts (which are
safetensors files).

Pickled files are only ever read with ``torch.load(..., weights_only=True)``: a file that would need to import
or call anything outside torch's weights-only allowlist is refused before any of its code runs.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.errors import CheckpointError
from pare.io._schema import read_header

# Keys under which training scripts commonly nest the state dict, in the order they are tried.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by wrappers: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NAMED = 5
_SAFETENSORS_HEADER_LIMIT_BYTES = 100_000_000
ARTIFACT_FORMAT = "pare-artifact"
ARTIFACT_FORMAT_KEY = "pare.format"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _some(names: list[str]) -> str:
    """At most five names, then how many more: keeps error messages on one readable line."""
    shown = ", ".join(names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return shown + (f" (+{more} more)" if more > 0 else "")


def is_safetensors_file(path: Path) -> bool:
    """True when the file starts like safetensors: 8-byte little-endian header length, then ``{``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 2 <= header_len <= _SAFETENSORS_HEADER_LIMIT_BYTES and head[8:9] == b"{"


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the string metadata of a safetensors file; CheckpointError if corrupt."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError and also OSError/ValueError
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_one_line(exc)})") from exc
    return tensors, metadata


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into one-line CheckpointErrors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" in message:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
            culprit = found.group(1) if found else "an object outside the weights-only allowlist"
            if found is None and "invalid load key" in message:
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({_one_line(exc)})") from None
            raise CheckpointError(
                f"{path}: refused to unpickle: it references {culprit}, which a weights-only load does not "
                "allow (the file could run code); re-save it as a plain state_dict of tensors"
            ) from None
        raise CheckpointError(f"{path}: corrupt or not a torch checkpoint ({_one_line(exc)})") from None
    except Exception as exc:  # a damaged stream fails anywhere in the unpickler (EOF, IndexError, zip errors)
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_one_line(exc)})") from None


def _extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None, dict[str, Any]]:
    """Find the state dict inside a loaded checkpoint.

    Returns (state dict, key it was nested under or None, JSON-able scalar side entries such as best_prec1).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    container_key: str | None = None
    state: Mapping[Any, Any] = obj
    if obj and not all(isinstance(value, torch.Tensor) for value in obj.values()):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                container_key = key
                state = obj[key]
                break
        else:
            raise CheckpointError(
                f"{path}: no state dict found: top-level keys are {_some(sorted(map(str, obj)))} and none of "
                f"{', '.join(_CONTAINER_KEYS)} holds a dict of tensors"
            )
    bad = [str(key) for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        where = f"['{container_key}']" if container_key else ""
        raise CheckpointError(f"{path}: state dict{where} has non-tensor entries: {_some(bad)}")
    # Scalar side entries of a wrapper (best_prec1, epoch, arch) are worth reporting; nested ones are not.
    extras = {
        str(key): value
        for key, value in obj.items()
        if container_key is not None and key != container_key and isinstance(value, (int, float, str, bool))
    }
    return {str(key): value for key, value in state.items()}, container_key, extras


def _strip_wrapper_prefixes(
    state: dict[str, torch.Tensor], model_keys: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    stripped: list[str] = []
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state) and not any(
                k.startswith(prefix) for k in model_keys
            ):
                state = {key[len(prefix) :]: value for key, value in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def _is_batch_counter(key: str) -> bool:
    return key == "num_batches_tracked" or key.endswith(".num_batches_tracked")


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file into a flat state dict (wrapper prefixes NOT yet stripped) and format info.

    Raises CheckpointError for missing, corrupt, unsafe or unrecognised files.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such checkpoint file")
    info: dict[str, Any] = {"path": str(file), "sha256": sha256_file(file)}
    if is_safetensors_file(file):
        read_header(file)  # dtypes, shapes and byte ranges checked before any tensor is read
        tensors, metadata = read_safetensors(file)
        info["serialization"] = "safetensors"
        info["format"] = (
            ARTIFACT_FORMAT if metadata.get(ARTIFACT_FORMAT_KEY) == ARTIFACT_FORMAT else "safetensors"
        )
        info["container_key"] = None
        info["extra"] = {}
        return tensors, info
    info["serialization"] = "torch-zip" if zipfile.is_zipfile(file) else "torch-legacy"
    obj = _torch_load_weights_only(file)
    state, container_key, extras = _extract_state_dict(obj, file)
    info["container_key"] = container_key
    info["extra"] = extras
    if container_key is None:
        info["format"] = "state-dict"
    elif (
        container_key == "state_dict"
        and "best_prec1" in extras
        and all(k.startswith("module.") for k in state)
    ):
        info["format"] = "akamaster-th"
    else:
        info["format"] = "wrapped-state-dict"
    return state, info


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, Any]:
    """Copy the weights stored in ``path`` into ``model`` (in place) and report what happened.

    Args:
        model: the receiving module; its parameter/buffer shapes must equal the checkpoint's.
        path: ``.th``/``.pth``/``.pt`` pickle (read weights-only), safetensors file or pare artifact.
        strict: when True, a key of the model absent from the file, or a key of the file absent from the
            model, is an error. ``num_batches_tracked`` counters absent from the file never are: the model
            keeps its own.

    Returns:
        info dict: ``path``, ``sha256`` (of the file), ``format`` (``akamaster-th``, ``state-dict``,
        ``wrapped-state-dict``, ``safetensors`` or ``pare-artifact``), ``serialization``, ``container_key``,
        ``prefix_stripped`` (list), ``loaded`` (keys filled), ``kept_from_model`` (batch counters the file
        lacks), ``missing`` and ``unexpected`` (non-empty only with strict=False), ``ignored`` (non-persistent
        buffers in the file), ``extra`` (scalar side entries of the checkpoint, e.g. ``best_prec1``).

    Raises:
        CheckpointError: unreadable/unsafe file, missing or unexpected keys (strict), shape mismatch (always).
    """
    file = Path(path)
    state, info = read_state_dict(file)
    model_state = model.state_dict()
    model_keys = set(model_state)
    state, stripped = _strip_wrapper_prefixes(state, model_keys)
    info["prefix_stripped"] = stripped

    # Artifacts also carry non-persistent buffers, which a state dict never holds.
    persistent = model_keys
    non_persistent = {name for name, _ in model.named_buffers(remove_duplicate=False)} - persistent
    ignored = sorted(key for key in state if key in non_persistent)
    missing_all = sorted(key for key in model_keys if key not in state)
    kept = [key for key in missing_all if _is_batch_counter(key)]
    missing = [key for key in missing_all if not _is_batch_counter(key)]
    unexpected = sorted(key for key in state if key not in model_keys and key not in non_persistent)
    mismatched = [
        f"{key} file {tuple(state[key].shape)} vs model {tuple(model_state[key].shape)}"
        for key in sorted(model_keys & set(state))
        if state[key].shape != model_state[key].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_some(mismatched)}")
    if strict and missing:
        problems.append(f"missing from file: {_some(missing)}")
    if strict and unexpected:
        problems.append(f"not in model: {_some(unexpected)}")
    if problems:
        raise CheckpointError(f"{file}: does not match {type(model).__name__}: " + "; ".join(problems))

    to_load = {key: state[key] for key in model_keys & set(state)}
    model.load_state_dict(to_load, strict=False)
    info.update(
        loaded=len(to_load), kept_from_model=kept, missing=missing, unexpected=unexpected, ignored=ignored
    )
    return info
