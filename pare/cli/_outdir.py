"""Output folders of a command: made when the run starts, removed again if the command fails before writing.

``prepare_out_dir`` (``pare.cli._common``) calls :func:`make_out_dir` once its checks passed; ``pare.cli.main``
calls :func:`discard_empty_out_dirs` when a command ends with an error, so a failed run never leaves an empty
``--out`` folder behind. Starting a run also deletes the temporary files an earlier killed run left (this
project's design, issue #11).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pare.io._atomic import remove_stale_temporaries

_CREATED: list[Path] = []


def make_out_dir(out: Path) -> Path:
    """Create ``out`` (and its missing parents), remember the top-most folder made, and delete stale
    temporaries of killed atomic writes in ``out`` and its subfolders."""
    top = None
    for folder in (out, *out.parents):
        if folder.exists():
            break
        top = folder
    out.mkdir(parents=True, exist_ok=True)
    if top is not None:
        _CREATED.append(top)
    for folder in (out, *(p for p in out.rglob("*") if p.is_dir())):
        remove_stale_temporaries(folder)
    return out


def discard_empty_out_dirs() -> None:
    """Remove the folders :func:`make_out_dir` created that are still empty (innermost first)."""
    while _CREATED:
        top = _CREATED.pop()
        for folder in sorted((p for p in (top, *top.rglob("*")) if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds on empty folders


def forget_out_dirs() -> None:
    """The command succeeded: keep what it made."""
    _CREATED.clear()
