"""Distributed data parallel plumbing for :func:`pare.train.fit`.

``fit`` initialises ``torch.distributed`` from the environment when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on
CUDA), so the same script runs single-process or under ``torchrun``::

    # one machine, 4 processes (one per GPU on CUDA, or CPU processes with gloo)
    torchrun --nproc_per_node=4 train.py

    # two machines, 8 GPUs each; run the same command on both, with a reachable rendezvous host:port
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-id=job42 \\
        --rdzv-endpoint=node0.example:29500 train.py

On multi-node runs ``out_dir`` must be on a file system every rank can read (resume loads the checkpoint on
every rank; only rank 0 writes it). On CUDA each process uses ``cuda:LOCAL_RANK``.

Data sharding. A ``torch.utils.data.DataLoader`` over a map-style data set is rebuilt with a
``DistributedSampler`` (shuffled iff the original was, seeded with the recipe seed, ``set_epoch`` every
epoch); its ``batch_size`` is the *global* batch and each rank gets ``batch_size // world_size``. Any other
loader must expose writable ``rank`` and ``world_size`` attributes (set before every epoch) and shard itself.
Evaluation loaders are split ``rank::world_size`` without padding and the metric sums are all-reduced, so
every sample counts exactly once. A custom loader built for one process (``world_size`` 1, e.g.
:class:`pare.data.InMemoryLoader` as in docs/training.md) is sharded on a copy: ``rank``/``world_size`` come
from the process group and its ``batch_size`` is divided by the world size, so the global batch stays the one
it was built with.

Timeouts. When ``fit`` creates the process group it gives every collective a bounded timeout,
``PARE_DIST_TIMEOUT_S`` seconds (default :data:`DEFAULT_TIMEOUT_S`, 10 minutes). A rank that is stopped,
hung or dead then makes the others fail after that long with a :class:`~pare.errors.DistributedError`
instead of waiting forever; checkpoints are written atomically by rank 0, so the last complete one stays
loadable (this project's design, issue #11).

BatchNorm statistics. Each rank's BatchNorm layers track running statistics of their own shard;
:func:`sync_batchnorm_stats` pools them over ranks (mean of the means; variance = mean of the second moments
minus the squared pooled mean) before every evaluation and checkpoint, so every rank evaluates, saves and
ends with the same statistics.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from pare.errors import ConfigError, DistributedError

DEFAULT_TIMEOUT_S = 600
TIMEOUT_ENV = "PARE_DIST_TIMEOUT_S"


@dataclass
class DistContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64, so counts stay exact)."""
        if not self.is_distributed:
            return list(values)
        # nccl only reduces device tensors; gloo reduces CPU tensors.
        reduce_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=reduce_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (a one-element list when not distributed)."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down if :func:`setup_distributed` created it."""
        if self.created_group and dist.is_initialized():
            dist.destroy_process_group()
            self.created_group = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def collective_timeout_s() -> float:
    """Seconds a collective may wait: ``PARE_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    if raw == "":
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e7:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def setup_distributed(device: str | torch.device = "cpu") -> DistContext:
    """Join the process group described by the torchrun environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or describe a single process when ``WORLD_SIZE`` is unset or 1.

    An already initialised default group is reused (and not destroyed by :meth:`DistContext.close`; its
    timeout is the one it was created with). A group created here has the timeout of
    :func:`collective_timeout_s`.
    """
    try:
        base_device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}") from None
    if base_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
        created = False
    else:
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        created = False
        if world_size > 1:
            if not dist.is_available():
                raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            backend = "nccl" if base_device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=collective_timeout_s())
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
            created = True
    local_rank = _env_int("LOCAL_RANK", rank)
    if base_device.type == "cuda" and world_size > 1:
        base_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(base_device)
    return DistContext(rank, world_size, local_rank, base_device, created)


def _rebuild_loader(loader: DataLoader, sampler: Sampler[int], batch_size: int) -> DataLoader:
    """A copy of ``loader`` with another sampler and batch size; everything else is carried over."""
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "sampler": sampler,
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if hasattr(loader, "in_order"):
        kwargs["in_order"] = loader.in_order
    return DataLoader(loader.dataset, **kwargs)


def _is_plain_map_loader(loader: Any) -> TypeGuard[DataLoader]:
    """A DataLoader built from ``batch_size`` (+ shuffle or a standard sampler) over a map-style data set."""
    return (
        isinstance(loader, DataLoader)
        and loader.batch_size is not None
        and not isinstance(loader.dataset, torch.utils.data.IterableDataset)
    )


def prepare_train_loader(loader: Iterable[Any], ctx: DistContext, seed: int) -> Iterable[Any]:
    """The loader ``fit`` iterates: data order depends only on (seed, epoch), and each rank sees its shard.

    A shuffled DataLoader gets a ``DistributedSampler(shuffle=True, seed=seed)`` even in a single process, so
    the order is the same function of (seed, epoch) whatever the world size (the DDP test relies on it).
    """
    if _is_plain_map_loader(loader):
        sampler = loader.sampler
        if isinstance(sampler, DistributedSampler):
            return loader
        shuffled = type(sampler) is RandomSampler and not sampler.replacement and sampler._num_samples is None
        sequential = type(sampler) is SequentialSampler
        if not (shuffled or sequential):
            if ctx.is_distributed:
                raise ConfigError(
                    f"cannot shard a DataLoader with a custom {type(sampler).__name__}; "
                    "give it a DistributedSampler yourself"
                )
            return loader
        if sequential and not ctx.is_distributed:
            return loader
        batch_size = int(loader.batch_size)  # type: ignore[arg-type]
        if batch_size % ctx.world_size:
            raise ConfigError(
                f"global batch size {batch_size} is not divisible by the world size {ctx.world_size}"
            )
        dist_sampler = DistributedSampler(
            loader.dataset,  # type: ignore[arg-type]
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=shuffled,
            seed=seed,
            drop_last=False,
        )
        return _rebuild_loader(loader, dist_sampler, batch_size // ctx.world_size)
    if isinstance(loader, DataLoader):
        if ctx.is_distributed:
            raise ConfigError(
                "cannot shard a DataLoader over an iterable data set or with a custom batch_sampler"
            )
        return loader
    if ctx.is_distributed and not (hasattr(loader, "rank") and hasattr(loader, "world_size")):
        raise ConfigError(
            f"train loader {type(loader).__name__} cannot be sharded: give it rank/world_size attributes "
            "or use a torch DataLoader"
        )
    return _shard_custom(loader, ctx, divide_batch=True)


def _shard_custom(loader: Any, ctx: DistContext, *, divide_batch: bool) -> Any:
    """A self-sharding loader for this rank: unchanged when it already names this rank and world size, else
    a shallow copy with ``rank``/``world_size`` of the process group; a loader built for one process also
    gets ``batch_size // world_size`` when ``divide_batch`` (the global batch is kept)."""
    if not ctx.is_distributed or (loader.rank, loader.world_size) == (ctx.rank, ctx.world_size):
        return loader
    sharded = copy.copy(loader)
    batch_size = getattr(loader, "batch_size", None)
    if divide_batch and loader.world_size == 1 and isinstance(batch_size, int):
        if batch_size % ctx.world_size:
            raise ConfigError(
                f"loader batch size {batch_size} is not divisible by the world size {ctx.world_size}"
            )
        sharded.batch_size = batch_size // ctx.world_size
    sharded.rank, sharded.world_size = ctx.rank, ctx.world_size
    return sharded


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(num_samples)``: a disjoint, unpadded split for
    evaluation."""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def prepare_eval_loader(loader: Iterable[Any], ctx: DistContext) -> tuple[Iterable[Any], bool]:
    """(loader, sharded): under DDP each rank evaluates a disjoint part when the loader can be split;
    otherwise every rank evaluates everything (``sharded`` False, metrics are then not summed over ranks)."""
    if not ctx.is_distributed:
        return loader, False
    if _is_plain_map_loader(loader):
        size = len(loader.dataset)  # type: ignore[arg-type]
        return _rebuild_loader(
            loader, ShardSampler(size, ctx.rank, ctx.world_size), int(loader.batch_size)
        ), True
    if not isinstance(loader, DataLoader) and hasattr(loader, "rank") and hasattr(loader, "world_size"):
        return _shard_custom(loader, ctx, divide_batch=False), True
    return loader, False


def begin_epoch(loader: Iterable[Any], epoch: int, ctx: DistContext) -> None:
    """Tell the loader which epoch starts (its shuffle seed) and, for custom loaders, which shard to
    produce."""
    if ctx.is_distributed and not isinstance(loader, DataLoader) and hasattr(loader, "world_size"):
        loader.rank = ctx.rank  # type: ignore[attr-defined]
        loader.world_size = ctx.world_size  # type: ignore[attr-defined]
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if isinstance(loader, DataLoader):
        for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)


def sync_batchnorm_stats(model: torch.nn.Module, ctx: DistContext) -> None:
    """Pool the BatchNorm running statistics of all ranks into every rank (in place; no-op in one process).

    For each BatchNorm layer with running statistics: ``running_mean`` = mean over ranks of the running
    means; ``running_var`` = mean over ranks of (running_var + running_mean**2) minus the pooled mean squared,
    the variance of the union of equally sized shards. Every rank must call it at the same point.
    """
    if not ctx.is_distributed:
        return
    layers = [
        m for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None
    ]  # fmt: skip
    if not layers:
        return
    reduce_device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat(
        [torch.cat([m.running_mean.double(), m.running_var.double() + m.running_mean.double() ** 2])
         for m in layers]
    ).to(reduce_device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = (flat / ctx.world_size).cpu()
    offset = 0
    with torch.no_grad():
        for m in layers:
            n = m.running_mean.numel()
            mean, second = flat[offset : offset + n], flat[offset + n : offset + 2 * n]
            offset += 2 * n
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_((second - mean**2).clamp_min(0).to(m.running_var.dtype))


_PEER_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe", "nccl")


def distributed_error(exc: RuntimeError, ctx: DistContext, checkpoint: os.PathLike[str] | str | None) -> Exception:
    """For a collective's timeout or a vanished peer (under DDP): one :class:`~pare.errors.DistributedError`
    naming this rank, the timeout and the checkpoint that stays loadable; any other error is returned as is."""
    text = " ".join(str(exc).split())
    if not ctx.is_distributed or not any(key in text.lower() for key in _PEER_FAILURES):
        return exc
    kept = f"; the last complete checkpoint (if any) is {checkpoint}" if checkpoint else ""
    return DistributedError(
        f"rank {ctx.rank}/{ctx.world_size}: a collective operation failed ({text[:200]}): another rank "
        f"stopped, hung or died (collectives wait at most {TIMEOUT_ENV}={collective_timeout_s():g} s){kept}"
    )
