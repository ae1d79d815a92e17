"""On-disk cache of decoded data sets: an uncompressed .npz of uint8 images and int64 labels.

Entries are keyed by the source files' resolved paths, sizes and modification times, so editing or replacing
a source invalidates its entry. Writes go to a temporary file in the cache folder, then ``os.replace`` moves
it into place, so a reader never sees a half-written entry even when several processes fill the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

CACHE_ENV = "PARE_CACHE"
# Bump when the decoded content for the same source would change (decoder settings, layout).
CACHE_FORMAT_VERSION = 1
_DISABLED = ("", "0", "off", "none", "false")


def cache_dir() -> Path | None:
    """The cache folder: ``$PARE_CACHE`` if set (``off``/``0``/empty disables caching), else ~/.cache/pare."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        if env.strip().lower() in _DISABLED:
            return None
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pare"


def cache_key(kind: str, sources: list[Path], extra: dict[str, str]) -> str:
    """Hex digest naming an entry: ``kind``, each source's path + size + mtime (ns), ``extra``."""
    parts: list[object] = [CACHE_FORMAT_VERSION, kind, sorted(extra.items())]
    for src in sources:
        st = src.stat()
        parts.append([str(src.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def load_cached(kind: str, key: str) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """(images uint8 (N, C, H, W), labels int64 (N,), class names) of an entry; None if absent/unreadable.

    An unreadable or inconsistent entry counts as a miss: the caller decodes the source again and rewrites it.
    """
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{kind}-{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], z["classes"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or labels.dtype != np.int64
        or labels.shape != images.shape[:1]
    ):
        return None
    if classes.ndim != 1 or classes.dtype.kind != "U" or (labels.size and int(labels.max()) >= classes.size):
        return None
    return images, labels, [str(c) for c in classes]


def store_cached(
    kind: str, key: str, images: np.ndarray, labels: np.ndarray, classes: list[str]
) -> Path | None:
    """Write an entry atomically; returns its path; None if caching is off or the folder unwritable."""
    folder = cache_dir()
    if folder is None:
        return None
    final = folder / f"{kind}-{key}.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{kind}-", suffix=".npz.tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, images=images, labels=labels, classes=np.array(classes, dtype=str))
            # mkstemp creates 0600; the cache holds public data, so let other users of the folder read it.
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError:
        # A read-only or full cache folder must not make loading fail: the data were decoded fine.
        return None
    return final
