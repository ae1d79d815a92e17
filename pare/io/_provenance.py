"""Provenance of a pare artifact (versions, git commit, creation time, user metadata) and byte-canonical
safetensors files, so that equal models saved with equal provenance give identical bytes (issue #11).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from pare.errors import ConfigError

_RESERVED_PROVENANCE = frozenset(
    {"pare_version", "torch_version", "python_version", "created_utc", "git_commit"}
)


def _git_commit() -> str | None:
    """Commit of the repository pare is imported from, or None (not a checkout, no git, no commits yet)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def created_utc(reproducible: bool = False) -> str | None:
    """Creation time for provenance, ISO 8601 UTC to the second.

    ``SOURCE_DATE_EPOCH`` (seconds since 1970, the reproducible-builds convention) replaces the clock when set;
    with ``reproducible`` and no ``SOURCE_DATE_EPOCH`` the time is left out (None).

    Raises:
        ConfigError: ``SOURCE_DATE_EPOCH`` is not a non-negative integer.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        if not epoch.strip().isdigit():
            raise ConfigError(f"SOURCE_DATE_EPOCH={epoch!r} is not a non-negative integer (seconds since 1970)")
        moment = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
    elif reproducible:
        return None
    else:
        moment = datetime.datetime.now(datetime.timezone.utc)
    return moment.isoformat(timespec="seconds")


def build_provenance(metadata: dict[str, Any] | None = None, *, reproducible: bool = False) -> dict[str, Any]:
    """Provenance record: versions, git commit, UTC timestamp (see :func:`created_utc`), plus the user's
    JSON-able ``metadata``."""
    from pare.version import __version__

    provenance: dict[str, Any] = {
        "pare_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created_utc": created_utc(reproducible),
        "git_commit": _git_commit(),
        "source_sha256": None,
    }
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"artifact metadata: key {key!r} is not a string")
        if key in _RESERVED_PROVENANCE:
            raise ConfigError(
                f"artifact metadata: key '{key}' is reserved for provenance pare records itself"
            )
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"artifact metadata: value of '{key}' is not JSON-serialisable ({exc})"
            ) from None
        provenance[key] = value
    return provenance



def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header keys in sorted order.

    The safetensors writer orders the metadata through a hash map, so two saves of one model can differ in
    bytes; sorting makes equal models with equal provenance give identical files. The header stays padded
    with spaces to a multiple of 8 bytes, as the format requires.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]
