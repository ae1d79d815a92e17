"""Seeded train/validation splits and the fixed calibration sample used by data-driven pruning criteria."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from pare.data.dataset import ImageDataset, ImageSubset, resolve_tensors
from pare.data.transforms import Normalization, seeded_generator, to_float
from pare.errors import ConfigError, DataError


def train_val_split(
    n: int, *, val_fraction: float | None = None, val_size: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into held-out validation indices and the remaining training indices.

    Give exactly one of ``val_fraction`` (in (0, 1); the size is rounded, at least 1) or ``val_size``.
    The same (n, size, seed) always gives the same split. Returns (train_idx, val_idx), both sorted int64 of
    shapes (n - V,) and (V,), disjoint, together covering 0..n-1.
    """
    if n < 2:
        raise ConfigError(f"train_val_split needs at least 2 samples, got n={n}")
    if (val_fraction is None) == (val_size is None):
        raise ConfigError("give exactly one of val_fraction or val_size")
    if val_fraction is not None:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        val_size = min(n - 1, max(1, round(n * val_fraction)))
    assert val_size is not None
    if not 0 < val_size < n:
        raise ConfigError(f"val_size must lie in [1, {n - 1}] for n={n}, got {val_size}")
    perm = torch.randperm(n, generator=seeded_generator(seed, n))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def calibration_batches(
    dataset: ImageDataset | ImageSubset | Dataset,
    n_images: int,
    batch_size: int,
    *,
    seed: int = 0,
    normalization: str | Normalization = "cifar",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, seeded, non-augmented sample of ``n_images`` from ``dataset`` (pass the training split, with
    the validation part already held out), as normalised batches.

    Returns a list of (images float32 (B, C, H, W), labels int64 (B,)); every batch has ``batch_size`` images
    except possibly the last. Identical across calls with the same arguments. Besides in-memory data sets, any
    Dataset whose items are (uint8 (C, H, W) tensor, int label) of one size is accepted.
    """
    n = len(dataset)
    if n_images <= 0 or batch_size <= 0:
        raise ConfigError(f"n_images and batch_size must be positive, got {n_images} and {batch_size}")
    if n_images > n:
        raise DataError(f"asked for {n_images} calibration images but the data set has only {n}")
    chosen = torch.randperm(n, generator=seeded_generator(seed, n, n_images))[:n_images]
    batches = []
    for start in range(0, n_images, batch_size):
        idx = chosen[start : start + batch_size]
        images, labels = _gather(dataset, idx)
        batches.append((to_float(images, normalization), labels))
    return batches


def _gather(
    dataset: ImageDataset | ImageSubset | Dataset, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (K, C, H, W) and int64 labels (K,) of samples ``idx``."""
    if isinstance(dataset, ImageDataset | ImageSubset):
        images, labels, base_idx = resolve_tensors(dataset)
        rows = idx if base_idx is None else base_idx[idx]
        return images[rows], labels[rows]
    items = [dataset[int(i)] for i in idx]
    first = items[0][0]
    if not isinstance(first, torch.Tensor) or first.dtype != torch.uint8 or first.ndim != 3:
        raise DataError(
            f"{type(dataset).__name__}: calibration needs items (uint8 (C, H, W), label); got "
            f"{type(first).__name__} {getattr(first, 'dtype', '')} (remove the item transform)"
        )
    try:
        images = torch.stack([img for img, _ in items])
    except RuntimeError as exc:
        raise DataError(
            f"{type(dataset).__name__}: images differ in size, cannot batch them ({exc})"
        ) from exc
    return images, torch.tensor([int(lbl) for _, lbl in items], dtype=torch.int64)
