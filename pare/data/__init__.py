"""Data sets, transforms, splits and calibration sampling.

Readers return uint8 images (N, C, H, W) with int64 labels; :func:`load_dataset` recognises the format from a
path. Augmentation and normalisation are torch ops applied per batch by the loaders.
"""

from __future__ import annotations

from pare.data.cache import cache_dir
from pare.data.dataset import ImageDataset, ImageSubset
from pare.data.formats import (
    CIFAR10_CLASSES,
    read_cifar10_binary,
    read_cifar10_lossless_npz,
    read_cifar10_pickle,
    read_cifar100_binary,
    read_cifar100_pickle,
    read_digits,
    read_idx,
    read_mnist,
    safe_load_pickle,
)
from pare.data.images import (
    ImageFolderStream,
    decode_image,
    load_image_folder,
    read_jpeg_tarball,
    scan_image_folder,
)
from pare.data.loaders import InMemoryLoader, ShardedSampler, StreamLoader, folder_loader, shard_order
from pare.data.registry import clear_memory_cache, detect_format, load_dataset
from pare.data.splits import calibration_batches, train_val_split
from pare.data.transforms import (
    NORMALIZATION,
    ImageNetTransform,
    Normalization,
    center_crop,
    hflip,
    normalization_stats,
    random_crop_flip,
    random_resized_crop,
    resize,
    seeded_generator,
    to_float,
)

__all__ = [
    "CIFAR10_CLASSES",
    "NORMALIZATION",
    "ImageDataset",
    "ImageFolderStream",
    "ImageNetTransform",
    "ImageSubset",
    "InMemoryLoader",
    "Normalization",
    "ShardedSampler",
    "StreamLoader",
    "cache_dir",
    "calibration_batches",
    "center_crop",
    "clear_memory_cache",
    "decode_image",
    "detect_format",
    "folder_loader",
    "hflip",
    "load_dataset",
    "load_image_folder",
    "normalization_stats",
    "random_crop_flip",
    "random_resized_crop",
    "read_cifar10_binary",
    "read_cifar10_lossless_npz",
    "read_cifar10_pickle",
    "read_cifar100_binary",
    "read_cifar100_pickle",
    "read_digits",
    "read_idx",
    "read_jpeg_tarball",
    "read_mnist",
    "resize",
    "safe_load_pickle",
    "scan_image_folder",
    "seeded_generator",
    "shard_order",
    "to_float",
    "train_val_split",
]
