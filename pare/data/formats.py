"""Readers for array-style data set files: CIFAR-10/100 (python pickles and binary), the lossless CIFAR-10
subset npz, MNIST IDX and scikit-learn's digits. Each returns an :class:`ImageDataset` (uint8 NCHW)."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pare.data.dataset import ImageDataset
from pare.errors import DataError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_PICKLE_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_PICKLE_TEST = ("test_batch",)
CIFAR10_BINARY_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_BINARY_TEST = ("test_batch.bin",)
CIFAR_IMAGE_BYTES = 3 * 32 * 32

# MNIST file-name prefixes; a suffix such as ".gz" or ".from_convnetjs.gz" may follow.
MNIST_PREFIXES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


# --------------------------------------------------------------------------------------------- pickles


def _numpy_global(module: str, name: str) -> Any:
    """Resolve a numpy-internal function under its numpy-1 or numpy-2 module path."""
    for candidate in (
        module,
        module.replace("numpy.core", "numpy._core"),
        module.replace("numpy._core", "numpy.core"),
    ):
        try:
            mod = __import__(candidate, fromlist=[name])
            return getattr(mod, name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


# The only globals the official CIFAR pickles (written by Python 2 with numpy) reference, plus what Python 3
# pickles of the same content use (_codecs.encode for protocol-2 bytes, _frombuffer for protocol 5).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts, lists, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (not part of a CIFAR pickle)"
            )
        if module == "numpy":
            return getattr(np, name)
        if module == "_codecs":
            import _codecs

            return _codecs.encode
        return _numpy_global(module, name)


def safe_load_pickle(path: Path) -> Any:
    """Load a CIFAR-style pickle through the restricted unpickler; DataError naming ``path`` on failure."""
    try:
        with open(path, "rb") as fh:
            # latin1 is what numpy documents for Python-2 pickles: str keys, array bytes kept intact.
            return _CifarUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except EOFError as exc:
        raise DataError(f"{path}: pickle is truncated (ended before its STOP opcode)") from exc
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "truncated" in msg:
            raise DataError(f"{path}: pickle is truncated ({msg})") from exc
        raise DataError(f"{path}: not a valid CIFAR pickle ({msg})") from exc
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error, MemoryError) as exc:
        raise DataError(f"{path}: corrupt pickle ({type(exc).__name__}: {exc})") from exc


def _key(d: dict, name: str) -> Any:
    """dict lookup tolerant of bytes keys (pickles loaded with encoding='bytes' by other tools)."""
    if name in d:
        return d[name]
    return d.get(name.encode())


def _decode_names(values: Any, path: Path, field: str) -> list[str]:
    if not isinstance(values, list | tuple) or not values:
        raise DataError(f"{path}: field {field!r} is not a non-empty list of names")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def _cifar_pickle_batch(path: Path, label_field: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one CIFAR pickle batch."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, the pickle holds {type(obj).__name__}")
    data = _key(obj, "data")
    labels = _key(obj, label_field)
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: missing or non-array 'data' field")
    if labels is None:
        raise DataError(f"{path}: missing {label_field!r} field")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    try:
        label_arr = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {label_field!r} is not a list of integers") from exc
    if label_arr.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {label_field!r} has shape {label_arr.shape}")
    return data.reshape(-1, 3, 32, 32), label_arr


def _check_files(root: Path, names: tuple[str, ...]) -> list[Path]:
    paths = [root / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{root}: missing file(s) {', '.join(missing)}")
    return paths


def _make(images: np.ndarray, labels: np.ndarray, classes: list[str], source: str) -> ImageDataset:
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:
        # Arrays viewing a bytes buffer (IDX) are read-only; torch tensors must own writable memory.
        images = images.copy()
    labels_t = torch.from_numpy(np.array(labels, dtype=np.int64))
    return ImageDataset(torch.from_numpy(images), labels_t, classes, source)


def read_cifar10_pickle(root: str | Path, split: str) -> ImageDataset:
    """CIFAR-10 python version (``cifar-10-batches-py``): data_batch_1..5 / test_batch, batches.meta optional.

    Returns images uint8 (50000 or 10000, 3, 32, 32) in official order.
    """
    root = Path(root)
    names = CIFAR10_PICKLE_TRAIN if _split(split) == "train" else CIFAR10_PICKLE_TEST
    parts = [_cifar_pickle_batch(p, "labels") for p in _check_files(root, names)]
    classes = list(CIFAR10_CLASSES)
    meta = root / "batches.meta"
    if meta.is_file():
        m = safe_load_pickle(meta)
        if not isinstance(m, dict) or _key(m, "label_names") is None:
            raise DataError(f"{meta}: expected a dict with 'label_names'")
        classes = _decode_names(_key(m, "label_names"), meta, "label_names")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _make(images, labels, classes, f"CIFAR-10 pickle {root} ({split})")


def read_cifar100_pickle(root: str | Path, split: str, label_kind: str = "fine") -> ImageDataset:
    """CIFAR-100 python pickles (cifar-100-python): train, test, meta; fine (100) or coarse (20) labels."""
    root = Path(root)
    if label_kind not in ("fine", "coarse"):
        raise DataError(f"{root}: label_kind must be 'fine' or 'coarse', got {label_kind!r}")
    (path,) = _check_files(root, (_split(split),))
    images, labels = _cifar_pickle_batch(path, f"{label_kind}_labels")
    n_classes = 100 if label_kind == "fine" else 20
    classes = [str(i) for i in range(n_classes)]
    meta = root / "meta"
    if meta.is_file():
        m = safe_load_pickle(meta)
        field = f"{label_kind}_label_names"
        if not isinstance(m, dict) or _key(m, field) is None:
            raise DataError(f"{meta}: expected a dict with {field!r}")
        classes = _decode_names(_key(m, field), meta, field)
    return _make(images, labels, classes, f"CIFAR-100 pickle {root} ({split}, {label_kind} labels)")


# --------------------------------------------------------------------------------------------- binary


def _cifar_binary_file(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 image bytes -> (images (N,3,32,32), labels (N,))."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + CIFAR_IMAGE_BYTES
    if raw.size == 0 or raw.size % record:
        raise DataError(
            f"{path}: size {raw.size} bytes is not a positive multiple of the {record}-byte record "
            "(truncated or not a CIFAR binary batch)"
        )
    rec = raw.reshape(-1, record)
    return rec[:, label_bytes:].reshape(-1, 3, 32, 32), rec[:, label_index].astype(np.int64)


def _read_names_txt(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DataError(f"{path}: no class names in file")
    return names


def read_cifar10_binary(root: str | Path, split: str) -> ImageDataset:
    """CIFAR-10 binary version (``cifar-10-batches-bin``): records of 1 label byte + 3072 bytes (R, G, B)."""
    root = Path(root)
    names = CIFAR10_BINARY_TRAIN if _split(split) == "train" else CIFAR10_BINARY_TEST
    parts = [_cifar_binary_file(p, 1, 0) for p in _check_files(root, names)]
    classes = _read_names_txt(root / "batches.meta.txt") or list(CIFAR10_CLASSES)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _make(images, labels, classes, f"CIFAR-10 binary {root} ({split})")


def read_cifar100_binary(root: str | Path, split: str, label_kind: str = "fine") -> ImageDataset:
    """CIFAR-100 binary version (``cifar-100-binary``): records: coarse byte, fine byte, 3072 bytes."""
    root = Path(root)
    if label_kind not in ("fine", "coarse"):
        raise DataError(f"{root}: label_kind must be 'fine' or 'coarse', got {label_kind!r}")
    (path,) = _check_files(root, (f"{_split(split)}.bin",))
    images, labels = _cifar_binary_file(path, 2, 1 if label_kind == "fine" else 0)
    n_classes = 100 if label_kind == "fine" else 20
    classes = _read_names_txt(root / f"{label_kind}_label_names.txt") or [str(i) for i in range(n_classes)]
    return _make(images, labels, classes, f"CIFAR-100 binary {root} ({split}, {label_kind} labels)")


# --------------------------------------------------------------------------------------------- lossless npz

NPZ_KEYS = ("x_test", "y_test", "x_train", "y_train")


def read_cifar10_lossless_npz(path: str | Path, split: str) -> ImageDataset:
    """The lossless CIFAR-10 subset npz: the first K official images of test_batch / each data_batch.

    ``x_test`` (K, 32, 32, 3) HWC with ``y_test`` holding all 10,000 test labels (the first K are used);
    ``x_train`` (5, K, 32, 32, 3) with ``y_train`` (5, 10000). Returns NCHW: (K, 3, 32, 32) for test,
    (5K, 3, 32, 32) for train (batch 1's K images, then batch 2's, ...).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(z.files)})")
            x = z["x_test"] if _split(split) == "test" else z["x_train"]
            y = z["y_test"] if split == "test" else z["y_train"]
            classes = (
                [str(c) for c in z["label_names"]] if "label_names" in z.files else list(CIFAR10_CLASSES)
            )
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read npz ({type(exc).__name__}: {exc})") from exc
    if x.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {x.dtype}")
    if split == "test":
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or y.ndim != 1 or y.shape[0] < x.shape[0]:
            raise DataError(
                f"{path}: expected x_test (K,32,32,3) and y_test (>=K,), got {x.shape} and {y.shape}"
            )
        images, labels = x, y[: x.shape[0]]
    else:
        if (
            x.ndim != 5
            or x.shape[2:] != (32, 32, 3)
            or y.ndim != 2
            or y.shape[0] != x.shape[0]
            or y.shape[1] < x.shape[1]
        ):
            raise DataError(
                f"{path}: expected x_train (B,K,32,32,3) and y_train (B,>=K), got {x.shape} and {y.shape}"
            )
        images, labels = x.reshape(-1, 32, 32, 3), y[:, : x.shape[1]].reshape(-1)
    return _make(
        images.transpose(0, 3, 1, 2),
        labels.astype(np.int64),
        classes,
        f"CIFAR-10 lossless npz {path} ({split})",
    )


# --------------------------------------------------------------------------------------------- MNIST


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not). Returns uint8 of the header's shape.

    DataError naming ``path`` for a wrong magic number or a size that does not match the header.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 8:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != expected_magic:
        raise DataError(f"{path}: bad IDX magic number {magic}, expected {expected_magic}")
    ndim = raw[3]
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", raw[4:header_bytes])
    expected = header_bytes + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX size mismatch: header {dims} needs {expected} bytes, file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


def find_by_prefix(root: Path, prefix: str) -> Path:
    """The one file in ``root`` whose name starts with ``prefix``; DataError if none or several."""
    hits = sorted(p for p in root.iterdir() if p.is_file() and p.name.startswith(prefix))
    if not hits:
        raise DataError(f"{root}: no file named {prefix}*")
    if len(hits) > 1:
        raise DataError(f"{root}: several files match {prefix}*: {', '.join(p.name for p in hits)}")
    return hits[0]


def read_mnist(root: str | Path, split: str) -> ImageDataset:
    """MNIST IDX files in ``root`` (train-*/t10k-* prefixes). Images uint8 (N, 1, 28, 28)."""
    root = Path(root)
    img_prefix, lbl_prefix = MNIST_PREFIXES[_split(split)]
    img_path, lbl_path = find_by_prefix(root, img_prefix), find_by_prefix(root, lbl_prefix)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected a 3-d IDX (N, H, W), got {images.ndim}-d")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected a 1-d IDX of labels, got {labels.ndim}-d")
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images in {img_path.name}"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0-9")
    return _make(
        images[:, None], labels.astype(np.int64), [str(i) for i in range(10)], f"MNIST {root} ({split})"
    )


# --------------------------------------------------------------------------------------------- digits

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def read_digits(split: str) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images, values 0-16) as uint8 (N, 1, 8, 8) scaled to 0-255.

    The split is a fixed seeded 80/20 partition (seed 0), the same on every machine.
    """
    from sklearn.datasets import load_digits

    from pare.data.splits import train_val_split

    bunch = load_digits()
    images = np.rint(bunch.images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_val_split(
        len(labels), val_fraction=DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED
    )
    idx = (train_idx if _split(split) == "train" else test_idx).numpy()
    return _make(
        images[idx],
        labels[idx],
        [str(i) for i in range(10)],
        f"scikit-learn digits ({split}, seeded 80/20 split)",
    )


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    return split


__all__ = [
    "CIFAR10_CLASSES",
    "read_cifar10_binary",
    "read_cifar10_lossless_npz",
    "read_cifar10_pickle",
    "read_cifar100_binary",
    "read_cifar100_pickle",
    "read_digits",
    "read_idx",
    "read_mnist",
    "safe_load_pickle",
]
