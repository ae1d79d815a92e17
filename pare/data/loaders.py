"""Batch iteration: a fast in-memory loader for decoded data sets and DataLoader construction for streamed
folders. Both shuffle from a generator seeded by (seed, epoch) and can shard across distributed ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from pare.data.dataset import ImageDataset, ImageSubset, resolve_tensors
from pare.data.images import ImageFolderStream
from pare.data.transforms import ImageNetTransform, Normalization, random_crop_flip, seeded_generator, to_float
from pare.errors import ConfigError

# (uint8 batch (B, C, H, W), generator) -> uint8 batch of the same shape.
BatchAugment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def shard_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's sample indices for one epoch, int64 (n // world_size,).

    The (optionally shuffled) order is truncated to a multiple of ``world_size`` and dealt round-robin, so the
    ranks get disjoint shards of equal size; with shuffling, which few samples are left out changes per epoch.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if n < world_size:
        raise ConfigError(f"{n} samples cannot be sharded over {world_size} ranks")
    order = torch.randperm(n, generator=seeded_generator(seed, epoch)) if shuffle else torch.arange(n)
    usable = (n // world_size) * world_size
    return order[:usable][rank::world_size]


class InMemoryLoader:
    """Iterates (images float32 (B, C, H, W), labels int64 (B,)) batches over an in-memory data set.

    Each batch is gathered from the uint8 tensor, augmented batch-wise (``augment="cifar"``: pad-4 random crop
    + horizontal flip; or a callable), converted to float and normalised. Call :meth:`set_epoch` before each
    epoch: the shuffle order and the augmentation draws depend only on (seed, epoch, rank), so a run is
    reproducible. ``rank``/``world_size`` give disjoint equal-size shards for distributed training.
    """

    def __init__(
        self,
        dataset: ImageDataset | ImageSubset,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: str | BatchAugment | None = None,
        normalization: str | Normalization = "cifar",
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if isinstance(augment, str):
            if augment != "cifar":
                raise ConfigError(f"unknown augment {augment!r}; use 'cifar', None or a callable")
            augment = random_crop_flip
        self.images, self.labels, self.base_indices = resolve_tensors(dataset)
        self.n = len(dataset)
        # Validate rank/world_size and the normalisation preset now rather than at the first batch.
        shard_order(self.n, shuffle=False, seed=seed, epoch=0, rank=rank, world_size=world_size)
        to_float(self.images[:1], normalization)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.normalization, self.seed, self.drop_last = normalization, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_rank = self.n // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def indices(self) -> torch.Tensor:
        """Row indices into the underlying data set for this epoch and rank, int64 (n // world_size,)."""
        order = shard_order(
            self.n,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
        )
        return order if self.base_indices is None else self.base_indices[order]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.indices()
        aug_gen = seeded_generator(self.seed, self.epoch, self.rank, 1) if self.augment is not None else None
        for b in range(len(self)):
            idx = rows[b * self.batch_size : (b + 1) * self.batch_size]
            images, labels = self.images[idx], self.labels[idx]
            if self.augment is not None:
                assert aug_gen is not None
                images = self.augment(images, aug_gen)
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield to_float(images, self.normalization), labels


class ShardedSampler(Sampler[int]):
    """Sampler with the same seeded (seed, epoch) shuffling and rank sharding as :class:`InMemoryLoader`."""

    def __init__(self, n: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        shard_order(n, shuffle=False, seed=seed, epoch=0, rank=rank, world_size=world_size)
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self) -> Iterator[int]:
        order = shard_order(
            self.n,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
        )
        return iter(order.tolist())


class StreamLoader:
    """A DataLoader over an :class:`ImageFolderStream` plus :meth:`set_epoch` that reaches the sampler and the
    per-item transform (workers are not persistent, so each epoch's iterator sees the new epoch)."""

    def __init__(self, dataset: ImageFolderStream, loader: DataLoader, sampler: ShardedSampler):
        self.dataset, self.loader, self.sampler = dataset, loader, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)


def folder_loader(
    dataset: ImageFolderStream,
    batch_size: int,
    *,
    train: bool,
    size: int = 224,
    resize_size: int = 256,
    normalization: str = "imagenet",
    workers: int = 2,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> StreamLoader:
    """DataLoader for a streamed image folder: workers decode JPEG/PNG, the :class:`ImageNetTransform` (train:
    random-resized-crop + flip; eval: resize + center-crop) makes float32 (3, size, size) items.

    Sets ``dataset.transform``. Yields (images float32 (B, C, size, size), labels int64 (B,)).
    """
    if batch_size <= 0 or workers < 0:
        raise ConfigError(f"batch_size must be positive and workers >= 0, got {batch_size} and {workers}")
    dataset.transform = ImageNetTransform(
        train=train, size=size, resize_size=resize_size, normalization=normalization, seed=seed
    )
    sampler = ShardedSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
    )
    return StreamLoader(dataset, loader, sampler)
