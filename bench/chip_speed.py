"""Benchmark: exact fast CHIP scores (pare.criteria.chip.chip_scores) vs the per-channel SVD definition.

Whole ResNet-56 (CIFAR-10), CHIP's 55 hooked maps (the stem ReLU, relu1 and relu2 of every block), 640 images in
5 batches of 128 (the official ``--repeat 5 --batch_size 128``). Uses the pretrained akamaster ResNet-56 and
CIFAR-10 train images from ../shared when present (seeded, not augmented), else random weights and inputs. Both
methods score the same captured maps in the same run; the forward pass is timed separately and is not part of
either figure.

Usage: python bench/chip_speed.py [--images 640] [--batch 128] [--threads 1]
Writes bench/results/chip_speed.json and prints the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import environment  # noqa: E402  (bench/ is on sys.path when run as a script)

import pare  # noqa: E402
from pare.criteria.chip import chip_scores, chip_scores_reference  # noqa: E402
from pare.models import create  # noqa: E402

SHARED = Path(os.environ.get("PARE_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "weights" / "akamaster_resnet56-4bfd9763.th"
CIFAR = SHARED / "data" / "cifar10_jpeg" / "CIFAR-10-images_YoongiKim_d7d0561.tar.gz"
MEAN = (0.4914, 0.4822, 0.4465)  # CHIP's CIFAR normalisation
STD = (0.2023, 0.1994, 0.2010)


def load_akamaster(model: nn.Module, path: Path) -> None:
    """Load an akamaster/pytorch_resnet_cifar10 checkpoint ({'state_dict': {'module.<key>': tensor}})."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)


def calibration_images(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n, 3, 32, 32) float32 normalised images and a description of their source."""
    if CIFAR.is_file():
        from pare.data import read_jpeg_tarball

        train = read_jpeg_tarball(CIFAR, ("train",))["train"]
        idx = torch.from_numpy(np.random.default_rng(seed).permutation(len(train))[:n])
        x = train.images[idx].float() / 255.0
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        return x, f"CIFAR-10 train, {n} images, seed {seed}"
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)), "random normal inputs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chip_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = create("resnet56").eval()
    weights = "random init (seed 0)"
    if WEIGHTS.is_file():
        load_akamaster(model, WEIGHTS)
        weights = WEIGHTS.name
    else:
        torch.manual_seed(0)
    images, source = calibration_images(args.images, args.seed)
    graph = pare.trace(model, images[:2])
    relus = [
        n for n in graph.gm.graph.nodes
        if n.op == "call_module" and isinstance(graph.gm.get_submodule(str(n.target)), nn.ReLU)
    ]
    capture = graph.capture(relus).eval()

    t_forward = t_ref = t_fast = 0.0
    sums_ref: dict[str, torch.Tensor] = {}
    sums_fast: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for start in range(0, args.images, args.batch):
        x = images[start : start + args.batch]
        t0 = time.perf_counter()
        with torch.no_grad():
            maps = capture(x)
        t_forward += time.perf_counter() - t0
        for node in relus:
            a = maps[node.name]
            shapes[node.name] = list(a.shape[1:])
            t0 = time.perf_counter()
            ref = chip_scores_reference(a).sum(0)
            t1 = time.perf_counter()
            fast = chip_scores(a).sum(0)
            t2 = time.perf_counter()
            t_ref += t1 - t0
            t_fast += t2 - t1
            sums_ref[node.name] = sums_ref.get(node.name, 0) + ref
            sums_fast[node.name] = sums_fast.get(node.name, 0) + fast
        print(f"images {start + len(x)}/{args.images}: reference {t_ref:.1f} s, fast {t_fast:.2f} s", flush=True)

    max_abs = max(float((sums_ref[k] - sums_fast[k]).abs().max()) / args.images for k in sums_ref)
    max_rel = max(
        float(((sums_ref[k] - sums_fast[k]).abs() / sums_ref[k].abs().clamp_min(1e-12)).max()) for k in sums_ref
    )
    same_order = sum(
        bool(torch.equal(torch.argsort(sums_ref[k], stable=True), torch.argsort(sums_fast[k], stable=True)))
        for k in sums_ref
    )
    result = {
        "model": "resnet56",
        "weights": weights,
        "data": source,
        "n_maps": len(relus),
        "map_shapes_c_h_w": sorted({tuple(s) for s in shapes.values()}),
        "images": args.images,
        "batch": args.batch,
        "threads": args.threads,
        "forward_s": t_forward,
        "reference_svd_s": t_ref,
        "fast_s": t_fast,
        "speedup": t_ref / t_fast,
        "max_abs_diff_mean_ci": max_abs,
        "max_rel_diff_mean_ci": max_rel,
        "maps_with_identical_ranking": same_order,
        **environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"speed ratio (reference / fast): {t_ref / t_fast:.1f}x")


if __name__ == "__main__":
    main()
