"""Benchmark: decoding the shared JPEG CIFAR-10 tarball (cold, then warm from the on-disk cache) and one epoch
of the in-memory loader with CIFAR augmentation at batch 128 over a 45,000-image train split.

Usage: python bench/data_loading.py [--data ../shared/data/cifar10_jpeg] [--threads 1] [--epochs 2]
Writes bench/results/data_loading.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pare.data import ImageDataset, InMemoryLoader, read_jpeg_tarball, train_val_split  # noqa: E402
from pare.data.registry import detect_format  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("PARE_SHARED", REPO.parent / "shared")) / "data" / "cifar10_jpeg"


def time_tarball(tar_path: Path, cache_root: Path) -> tuple[dict[str, float], ImageDataset]:
    """Seconds for: decode without cache, decode + cache write into an empty cache, load from the warm cache.

    Returns (figures, the decoded train split (50000, 3, 32, 32) uint8).
    """
    os.environ["PARE_CACHE"] = "off"
    t0 = time.perf_counter()
    cold = read_jpeg_tarball(tar_path, use_cache=False)
    cold_s = time.perf_counter() - t0
    n_images = sum(len(d) for d in cold.values())
    del cold

    os.environ["PARE_CACHE"] = str(cache_root)
    t0 = time.perf_counter()
    read_jpeg_tarball(tar_path, use_cache=True)
    cold_write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = read_jpeg_tarball(tar_path, use_cache=True)
    warm_s = time.perf_counter() - t0
    cache_bytes = sum(p.stat().st_size for p in cache_root.glob("*.npz"))
    stats = {
        "n_images": n_images,
        "cold_decode_no_cache_s": cold_s,
        "cold_decode_plus_cache_write_s": cold_write_s,
        "warm_cache_load_s": warm_s,
        "cache_size_bytes": cache_bytes,
        "decode_images_per_s": n_images / cold_s,
    }
    return stats, warm["train"]


def time_loader(
    train: ImageDataset, *, seed: int, epochs: int, batch_size: int, val_size: int
) -> dict[str, object]:
    """Per-epoch seconds of InMemoryLoader (augment + float + normalise) over the train part of a split."""
    train_idx, _ = train_val_split(len(train), val_size=val_size, seed=seed)
    loader = InMemoryLoader(
        train.subset(train_idx), batch_size, augment="cifar", normalization="cifar", seed=seed
    )
    epoch_s = []
    checksum = 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for images, _ in loader:
            # Touch one value per batch so the work cannot be skipped; cheap next to the batch itself.
            checksum += float(images[0, 0, 0, 0])
        epoch_s.append(time.perf_counter() - t0)
    return {
        "train_images": len(train_idx),
        "batch_size": batch_size,
        "batches_per_epoch": len(loader),
        "epoch_s": epoch_s,
        "images_per_s": len(train_idx) / min(epoch_s),
        "checksum": checksum,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JPEG tarball or its folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_loading.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    fmt, tar_path = detect_format(args.data)
    if fmt != "jpeg-tarball":
        parser.error(f"{args.data} is {fmt}, not a JPEG tarball")

    saved_env = os.environ.get("PARE_CACHE")
    with tempfile.TemporaryDirectory(prefix="pare-bench-cache-") as tmp:
        try:
            tar, train = time_tarball(tar_path, Path(tmp))
        finally:
            if saved_env is None:
                os.environ.pop("PARE_CACHE", None)
            else:
                os.environ["PARE_CACHE"] = saved_env
    # 50,000 - 5,000 held out for validation = the 45,000-image train split.
    loader = time_loader(train, seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, val_size=5000)

    result = {
        "benchmark": "data_loading",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": args.seed,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "host_cores": os.cpu_count(),
        "platform": platform.platform(),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": str(tar_path),
        "tarball": tar,
        "loader": loader,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"JPEG CIFAR-10 ({tar['n_images']} images): cold decode {tar['cold_decode_no_cache_s']:.2f} s "
        f"({tar['decode_images_per_s']:.0f} img/s), "
        f"cold + cache write {tar['cold_decode_plus_cache_write_s']:.2f} s, "
        f"warm from cache {tar['warm_cache_load_s']:.2f} s"
    )
    print(
        f"InMemoryLoader, {loader['train_images']} images, batch {loader['batch_size']}, cifar augment: "
        f"epochs {', '.join(f'{s:.2f}' for s in loader['epoch_s'])} s ({loader['images_per_s']:.0f} img/s)"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
