"""In-memory image data sets: uint8 image tensors plus int64 labels, and index views of them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pare.errors import DataError


def _as_index_tensor(
    indices: Sequence[int] | torch.Tensor | np.ndarray, length: int, what: str
) -> torch.Tensor:
    """Validate indices into a sequence of ``length`` items; returns an int64 tensor of shape (K,)."""
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
    if idx.ndim != 1:
        raise DataError(f"{what}: indices must be one-dimensional, got shape {tuple(idx.shape)}")
    if idx.numel() and (idx.dtype == torch.bool or idx.is_floating_point()):
        raise DataError(f"{what}: indices must be integers, got dtype {idx.dtype}")
    idx = idx.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= length):
        raise DataError(
            f"{what}: indices must lie in [0, {length}), got [{int(idx.min())}, {int(idx.max())}]"
        )
    return idx


class ImageDataset(Dataset):
    """A decoded image data set held in memory.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W).
        labels: int64 tensor of shape (N,), each in ``[0, len(classes))``.
        classes: class names; ``labels`` index into it.
        source: human-readable description of where the data came from (path, format, split).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], source: str):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(
                f"{source}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{source}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise DataError(
                f"{source}: labels span [{int(labels.min())}, {int(labels.max())}] "
                f"but there are {len(classes)} classes"
            )
        self.images = images
        self.labels = labels
        self.classes = list(classes)
        self.source = source

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """One sample: uint8 image (C, H, W) and its integer label."""
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageSubset:
        """A view on the samples at ``indices`` (no image copy until ``.images`` is read)."""
        return ImageSubset(self, indices)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset({n} x {c}x{h}x{w} uint8, {len(self.classes)} classes, source={self.source!r})"


class ImageSubset(Dataset):
    """The samples of an :class:`ImageDataset` at given indices, without copying the images.

    ``base`` is the underlying full data set, ``indices`` an int64 tensor of shape (K,) into it.
    Loaders gather batches straight from ``base.images`` through ``indices``.
    """

    def __init__(self, base: ImageDataset | ImageSubset, indices: Sequence[int] | torch.Tensor | np.ndarray):
        idx = _as_index_tensor(indices, len(base), f"subset of {base.source}")
        if isinstance(base, ImageSubset):
            # Compose views so that every subset points at the one data set that owns the tensors.
            idx = base.indices[idx]
            base = base.base
        self.base: ImageDataset = base
        self.indices = idx

    @property
    def classes(self) -> list[str]:
        return self.base.classes

    @property
    def source(self) -> str:
        return f"{self.base.source} [subset of {len(self.indices)}]"

    @property
    def images(self) -> torch.Tensor:
        """The subset's images, uint8 (K, C, H, W) (a gathered copy)."""
        return self.base.images[self.indices]

    @property
    def labels(self) -> torch.Tensor:
        """The subset's labels, int64 (K,)."""
        return self.base.labels[self.indices]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[index])]

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageSubset:
        return ImageSubset(self, indices)

    def __repr__(self) -> str:
        return f"ImageSubset({len(self)} of {self.base!r})"


def resolve_tensors(
    dataset: ImageDataset | ImageSubset,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images (N, C, H, W) uint8, labels (N,) int64, indices (K,) or None) of an in-memory data set."""
    if isinstance(dataset, ImageSubset):
        return dataset.base.images, dataset.base.labels, dataset.indices
    if isinstance(dataset, ImageDataset):
        return dataset.images, dataset.labels, None
    raise DataError(
        f"expected an in-memory ImageDataset or ImageSubset, got {type(dataset).__name__} "
        "(streamed folders go through pare.data.folder_loader)"
    )
