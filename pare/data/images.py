"""Image files: a class-per-folder tree (the ImageNet layout) streamed lazily or decoded into memory, and a
tarball of JPEGs (the shared CIFAR-10 JPEG archive) read in official order straight from the .tar.gz."""

from __future__ import annotations

import csv
import io
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pare.data import cache as disk_cache
from pare.data.dataset import ImageDataset
from pare.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")

# (image uint8 (C, H, W), sample index, epoch) -> tensor; index and epoch let random transforms seed per item
# so that augmentation does not depend on which DataLoader worker decodes which item.
ItemTransform = Callable[[torch.Tensor, int, int], torch.Tensor]


def decode_image(data: bytes, name: str, mode: str = "RGB") -> np.ndarray:
    """Decode JPEG/PNG bytes to uint8 (H, W, C) (C = 3 for RGB, 1 for L); DataError naming ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            # np.array (not asarray) so the result is writable and torch.from_numpy can own it.
            arr = np.array(im.convert(mode))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: unreadable image ({exc})") from exc
    return arr[:, :, None] if arr.ndim == 2 else arr


# --------------------------------------------------------------------------------------------- folders


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and (file, label) samples of ``root/<class>/*.jpg|jpeg|png``.

    DataError when ``root`` is missing, has no class folders, or a class folder holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class_name>/*.jpg)")
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"{root / name}: empty class folder (no {'/'.join(IMAGE_SUFFIXES)} files)")
        samples.extend((f, label) for f in files)
    return classes, samples


class ImageFolderStream(Dataset):
    """An image folder decoded one item at a time (for sets too large to hold in memory).

    ``dataset[i]`` is ``(image, label)`` where image is uint8 (C, H, W), or whatever ``transform`` returns
    (e.g. float (C, S, S)); it is safe to use with DataLoader workers (only paths are pickled).
    """

    def __init__(self, root: str | Path, *, mode: str = "RGB", transform: ItemTransform | None = None):
        self.root = Path(root)
        self.classes, self.samples = scan_image_folder(self.root)
        self.mode = mode
        self.transform = transform
        self.epoch = 0
        self.source = f"image folder {self.root} (streamed)"

    def set_epoch(self, epoch: int) -> None:
        """Epoch passed to ``transform``; set it before creating the DataLoader iterator of that epoch."""
        self.epoch = int(epoch)

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,) labels of all samples (no decoding)."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """Decoded uint8 (C, H, W) image of sample ``index``."""
        path = self.samples[index][0]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from exc
        return torch.from_numpy(decode_image(data, str(path), self.mode)).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image, index, self.epoch)
        return image, self.samples[index][1]


def load_image_folder(root: str | Path, *, mode: str = "RGB") -> ImageDataset:
    """Decode a whole image folder into memory (small sets). All images must share one size."""
    root = Path(root)
    classes, samples = scan_image_folder(root)
    first = None
    images: np.ndarray | None = None
    for i, (path, _) in enumerate(samples):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc})") from exc
        arr = decode_image(data, str(path), mode)
        if images is None:
            first = path
            images = np.empty((len(samples), *arr.shape), dtype=np.uint8)
        elif arr.shape != images.shape[1:]:
            raise DataError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {first} is "
                f"{images.shape[2]}x{images.shape[1]}; "
                "in-memory mode needs one size (use the streamed mode with a resize/crop transform)"
            )
        images[i] = arr
    assert images is not None  # scan_image_folder guarantees at least one sample
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return ImageDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels),
        classes,
        f"image folder {root}",
    )


# --------------------------------------------------------------------------------------------- tarball

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _member_path(name: str) -> str | None:
    """``split/class/file`` of a tar member name, tolerating a leading './' or one top folder; else None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    for start in (0, 1):
        if len(parts) - start == 3 and parts[start] in SPLITS:
            return "/".join(parts[start:])
    return None


def _read_order_csv(path: Path, split: str) -> list[tuple[int, str]]:
    """Rows of an official-order CSV as (label, jpeg_path), sorted into official order.

    test: ``index,label,jpeg_path``; train: ``batch,index_in_batch,label,jpeg_path``. The keys must number the
    images 0..N-1 (within each batch for train) without gaps or repeats.
    """
    key_cols = ("index",) if split == "test" else ("batch", "index_in_batch")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            needed = (*key_cols, "label", "jpeg_path")
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in needed):
                raise DataError(f"{path}: expected columns {','.join(needed)}, found {reader.fieldnames}")
            rows = []
            for line_no, row in enumerate(reader, start=2):
                try:
                    key = tuple(int(row[c]) for c in key_cols)
                    rows.append((key, int(row["label"]), row["jpeg_path"].strip()))
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{path}: line {line_no}: non-integer or missing field ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: no rows")
    rows.sort()
    groups: dict[tuple[int, ...], list[int]] = {}
    for key, _, _ in rows:
        groups.setdefault(key[:-1], []).append(key[-1])
    for group, idx in groups.items():
        if idx != list(range(len(idx))):
            where = f" in batch {group[0]}" if group else ""
            raise DataError(f"{path}: indices{where} are not 0..{len(idx) - 1} without gaps or repeats")
    return [(label, jpeg) for _, label, jpeg in rows]


def _tar_sources(tar_path: Path, split: str) -> tuple[Path | None, list[Path]]:
    csv_path = tar_path.parent / f"{split}_official_order.csv"
    if csv_path.is_file():
        return csv_path, [tar_path, csv_path]
    return None, [tar_path]


def read_jpeg_tarball(
    tar_path: str | Path, splits: tuple[str, ...] = SPLITS, *, use_cache: bool = True
) -> dict[str, ImageDataset]:
    """Decode ``split/<class>/*.jpg`` members of a tarball without extracting it, one pass for all ``splits``.

    If ``<split>_official_order.csv`` sits next to the tarball, images come in that order with its labels
    (checked against each file's class folder); otherwise in sorted (class, file name) order. Classes are the
    sorted class-folder names. Returns {split: ImageDataset with images uint8 (N, 3, H, W)}. With
    ``use_cache``, decoded arrays are stored in / loaded from the on-disk cache (see :mod:`pare.data.cache`).
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise DataError(f"{tar_path}: tarball not found")
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"split must be 'train' or 'test', got {s!r}")
    result: dict[str, ImageDataset] = {}
    keys: dict[str, str] = {}
    for split in splits:
        csv_path, sources = _tar_sources(tar_path, split)
        keys[split] = disk_cache.cache_key("jpegtar", sources, {"split": split})
        hit = disk_cache.load_cached("jpegtar", keys[split]) if use_cache else None
        if hit is not None:
            result[split] = _tar_dataset(tar_path, split, csv_path, *hit)

    todo = [s for s in splits if s not in result]
    if not todo:
        return result
    members = _read_members(tar_path, set(todo))
    for split in todo:
        csv_path, _ = _tar_sources(tar_path, split)
        names = members.get(split, {})
        if not names:
            raise DataError(f"{tar_path}: no {split}/<class>/*.jpg members")
        classes = sorted({n.split("/")[1] for n in names})
        if csv_path is not None:
            order = _read_order_csv(csv_path, split)
            for label, jpeg in order:
                if jpeg not in names:
                    raise DataError(f"{csv_path}: {jpeg} is not in {tar_path.name}")
                folder = jpeg.split("/")[1]
                if not 0 <= label < len(classes) or classes[label] != folder:
                    raise DataError(
                        f"{csv_path}: label {label} of {jpeg} disagrees with its class folder {folder!r}"
                    )
        else:
            order = [(classes.index(n.split("/")[1]), n) for n in sorted(names)]
        images = _decode_all([(names[jpeg], f"{tar_path}:{jpeg}") for _, jpeg in order])
        labels = np.array([label for label, _ in order], dtype=np.int64)
        if use_cache:
            disk_cache.store_cached("jpegtar", keys[split], images, labels, classes)
        result[split] = _tar_dataset(tar_path, split, csv_path, images, labels, classes)
    return {s: result[s] for s in splits}


def _read_members(tar_path: Path, splits: set[str]) -> dict[str, dict[str, bytes]]:
    """{split: {"split/class/file": bytes}} for image members of the wanted splits, read in one stream."""
    out: dict[str, dict[str, bytes]] = {s: {} for s in splits}
    try:
        # Stream mode: one sequential pass through the gzip, no seeking and no extraction to disk.
        with tarfile.open(tar_path, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                rel = _member_path(member.name)
                if rel is None or not rel.lower().endswith(IMAGE_SUFFIXES):
                    continue
                split = rel.split("/", 1)[0]
                if split in splits:
                    fh = tf.extractfile(member)
                    if fh is None:
                        raise DataError(f"{tar_path}: cannot read member {member.name}")
                    out[split][rel] = fh.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{tar_path}: corrupt or truncated tarball ({type(exc).__name__}: {exc})") from exc
    return out


def _decode_all(items: list[tuple[bytes, str]]) -> np.ndarray:
    """Decode JPEG/PNG bytes into uint8 (N, 3, H, W); all must share the first image's size."""
    first = decode_image(items[0][0], items[0][1])
    out = np.empty((len(items), *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, len(items)):
        data, name = items[i]
        arr = decode_image(data, name)
        if arr.shape != first.shape:
            raise DataError(f"{name}: image shape {arr.shape} differs from {items[0][1]} {first.shape}")
        out[i] = arr
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _tar_dataset(
    tar_path: Path,
    split: str,
    csv_path: Path | None,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
) -> ImageDataset:
    order = f"official order from {csv_path.name}" if csv_path is not None else "sorted folder order"
    return ImageDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        classes,
        f"JPEG tarball {tar_path} ({split}, {order})",
    )
