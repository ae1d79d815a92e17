"""Atomic file writes: a reader never sees a half-written artifact, and a failed write keeps the previous
file.

The data goes to a temporary file in the destination's own directory (``os.replace`` is only atomic within one
file system), is flushed and fsync'ed, and only then renamed over the destination.

Temporary files are named ``.<name>.<pid>.<random>.tmp``. A process killed mid-write (SIGKILL, power loss)
cannot delete its own; the next atomic write into the same folder, or :func:`remove_stale_temporaries` at the
start of a run, deletes those whose writing process no longer exists (this project's design).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pare.errors import CheckpointError


def fsync_file(path: Path) -> None:
    """Force the bytes of ``path`` to disk (a file another library wrote, e.g. the ONNX exporter)."""
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some platforms (Windows) cannot open a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[^.]+\.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but belongs to someone else, or the platform cannot tell
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``directory`` (only ``name``'s when
    given) whose writing process is gone; return what was deleted."""
    folder = Path(directory)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        found = _TEMPORARY.fullmatch(entry.name)
        if found is None or (name is not None and found["name"] != name) or _process_alive(int(found["pid"])):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def temporary_next_to(target: Path) -> Path:
    """A new empty temporary file beside ``target`` (stale ones of earlier killed writers are removed first)."""
    remove_stale_temporaries(target.parent, target.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(tmp_name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path``, on error it is deleted.

    The caller writes the complete file to the yielded path (and fsyncs it, see :func:`fsync_file`).
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise CheckpointError(f"{target}: cannot write, directory {target.parent} does not exist")
    tmp = temporary_next_to(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, flush, fsync, rename)."""
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return target
