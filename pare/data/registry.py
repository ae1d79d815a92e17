"""``load_dataset``: one entry point that recognises a data set's format from its path (or "digits")."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from pare.data import formats
from pare.data.dataset import ImageDataset
from pare.data.images import TAR_SUFFIXES, ImageFolderStream, load_image_folder, read_jpeg_tarball
from pare.errors import DataError

KNOWN_NAMES = ("digits",)
# Decoded data sets kept in this process, so asking twice does not decode twice. Small: each may be ~200 MB.
_MEMO: OrderedDict[tuple, ImageDataset] = OrderedDict()
_MEMO_MAX_ENTRIES = 6


def clear_memory_cache() -> None:
    """Forget the data sets decoded in this process (the on-disk cache is untouched)."""
    _MEMO.clear()


def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format, path to read) for a data set path; DataError when the format is not recognised.

    Formats: "cifar10-pickle", "cifar100-pickle", "cifar10-binary", "cifar100-binary", "mnist",
    "image-folder" (a root with train/ and test/ class folders), "jpeg-tarball", "lossless-npz".
    """
    path = Path(path)
    if path.is_file():
        name = path.name.lower()
        if name.endswith(".npz"):
            return "lossless-npz", path
        if name.endswith(TAR_SUFFIXES):
            return "jpeg-tarball", path
        raise DataError(f"{path}: unrecognised data file (expected a .npz or a .tar.gz of JPEGs)")
    if not path.is_dir():
        raise DataError(
            f"{path}: no such file or directory, and not one of the names {', '.join(KNOWN_NAMES)}"
        )
    files = {p.name for p in path.iterdir() if p.is_file()}
    dirs = {p.name for p in path.iterdir() if p.is_dir()}
    # One batch suffices to recognise the layout; reading a split then names its missing or damaged file.
    if {"data_batch_1", "test_batch"} & files:
        return "cifar10-pickle", path
    if {"data_batch_1.bin", "test_batch.bin"} & files:
        return "cifar10-binary", path
    if {"train.bin", "test.bin"} <= files:
        return "cifar100-binary", path
    if {"train", "test", "meta"} <= files:
        return "cifar100-pickle", path
    if any(
        f.startswith(formats.MNIST_PREFIXES["train"][0]) or f.startswith(formats.MNIST_PREFIXES["test"][0])
        for f in files
    ):
        return "mnist", path
    if {"train", "test"} <= dirs:
        return "image-folder", path
    tars = sorted(f for f in files if f.lower().endswith(TAR_SUFFIXES))
    if len(tars) == 1:
        return "jpeg-tarball", path / tars[0]
    if len(tars) > 1:
        raise DataError(f"{path}: several tarballs ({', '.join(tars)}); pass the one to read")
    npzs = sorted(f for f in files if f.lower().endswith(".npz"))
    if len(npzs) == 1:
        return "lossless-npz", path / npzs[0]
    raise DataError(
        f"{path}: unrecognised data set folder (expected CIFAR pickle/binary batches, MNIST IDX files, "
        "train/ and test/ class folders, one JPEG tarball or one npz)"
    )


def _signature(path: Path) -> tuple:
    """Sizes and mtimes of ``path`` and its direct children: a changed file gives a new memo key."""
    entries = [path, *sorted(path.iterdir())] if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in entries)


def load_dataset(
    path_or_name: str | Path,
    split: str = "train",
    *,
    stream: bool = False,
    use_cache: bool = True,
    label_kind: str = "fine",
) -> ImageDataset | ImageFolderStream:
    """Load a data set split as uint8 images (N, C, H, W) + int64 labels; the format is read off the path.

    Args:
        path_or_name: a data set file or folder (see :func:`detect_format`) or the name "digits".
        split: "train" or "test".
        stream: for image folders only, return an :class:`ImageFolderStream` that decodes per item instead of
            decoding everything into memory.
        use_cache: reuse data sets already decoded in this process and, for JPEG tarballs, the on-disk cache.
        label_kind: CIFAR-100 only: "fine" (100 classes) or "coarse" (20).
    Returns:
        an :class:`ImageDataset` (fields images, labels, classes, source), or ImageFolderStream if ``stream``.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(path_or_name, str) and path_or_name in KNOWN_NAMES and not Path(path_or_name).exists():
        key: tuple = ("digits", split)
        fmt, path = "digits", Path(path_or_name)
    else:
        fmt, path = detect_format(path_or_name)
        if stream:
            if fmt != "image-folder":
                raise DataError(f"{path}: stream=True is only for image folders, this is {fmt}")
            return ImageFolderStream(path / split)
        key = (fmt, str(path.resolve()), split, label_kind, _signature(path))
    if use_cache and key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    dataset = _read(fmt, path, split, use_cache, label_kind)
    if use_cache:
        _MEMO[key] = dataset
        while len(_MEMO) > _MEMO_MAX_ENTRIES:
            _MEMO.popitem(last=False)
    return dataset


def _read(fmt: str, path: Path, split: str, use_cache: bool, label_kind: str) -> ImageDataset:
    if fmt == "digits":
        return formats.read_digits(split)
    if fmt == "cifar10-pickle":
        return formats.read_cifar10_pickle(path, split)
    if fmt == "cifar100-pickle":
        return formats.read_cifar100_pickle(path, split, label_kind)
    if fmt == "cifar10-binary":
        return formats.read_cifar10_binary(path, split)
    if fmt == "cifar100-binary":
        return formats.read_cifar100_binary(path, split, label_kind)
    if fmt == "mnist":
        return formats.read_mnist(path, split)
    if fmt == "lossless-npz":
        return formats.read_cifar10_lossless_npz(path, split)
    if fmt == "jpeg-tarball":
        return read_jpeg_tarball(path, (split,), use_cache=use_cache)[split]
    if fmt == "image-folder":
        return load_image_folder(path / split)
    raise DataError(f"{path}: no reader for format {fmt}")
