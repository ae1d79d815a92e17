"""Atomic file writes: a reader never sees a half-written artifact, and a failed write keeps the previous
file.

The data goes to a temporary file in the destination's own directory (``os.replace`` is only atomic within one
file system), is flushed and fsync'ed, and only then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pare.errors import CheckpointError


def fsync_file(path: Path) -> None:
    """Force the bytes of ``path`` to disk (a file another library wrote, e.g. the ONNX exporter)."""
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some platforms (Windows) cannot open a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``, on error it is deleted.

    The caller writes the complete file to the yielded path (and fsyncs it, see :func:`fsync_file`).
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise CheckpointError(f"{target}: cannot write, directory {target.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, flush, fsync, rename)."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return target
