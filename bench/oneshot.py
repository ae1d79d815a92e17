"""One-shot pruning of the akamaster ResNet-56 at 50% MACs: every pare criterion vs Torch-Pruning.

Rows: criterion x residual mode (internal-only, grouped) x repair (none; BN recalibration on 1024 training
images; least-squares compensation + recalibration). Accuracy on the 932 lossless official test images and,
optionally (``--jpeg-test-limit``), on the JPEG test set. Torch-Pruning's L1/L2/FPGM/Taylor prune the
block-internal convs only (its ``ignored_layers`` keep every residual conv), at the same MACs.

Writes bench/results/oneshot.json and docs/results/oneshot.md. Skips (exit 0) when /work/shared is absent.

    python bench/oneshot.py [--criteria l1,chip] [--jpeg-test-limit 2000] [--no-torch-pruning]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pare  # noqa: E402
import pare.criteria  # noqa: E402  (registers the criteria)
from pare.allocate import Budget  # noqa: E402
from pare.compensate import compensate  # noqa: E402
from pare.count import count  # noqa: E402
from pare.criteria.base import list_criteria  # noqa: E402
from pare.data import InMemoryLoader, calibration_batches, load_dataset  # noqa: E402
from pare.evaluate import evaluate, recalibrate_bn  # noqa: E402
from pare.io import load_checkpoint  # noqa: E402
from pare.models import create  # noqa: E402
from pare.prune import prune  # noqa: E402

SHARED = Path(os.environ.get("PARE_SHARED", REPO.parent / "shared"))
NORM = "imagenet"  # the akamaster checkpoints were trained with ImageNet mean/std (SOURCES.md)
TARGET = 0.5


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def accuracy(model: nn.Module, loaders: dict[str, InMemoryLoader]) -> dict[str, float]:
    return {name: round(float(evaluate(model, loader, topk=(1,))["top1"]), 2) for name, loader in loaders.items()}


def tp_rows(base: nn.Module, x: torch.Tensor, calib: list, recal: list, loaders: dict, base_macs: int
            ) -> list[dict[str, Any]]:
    """Torch-Pruning baselines; a failure is recorded as a row with an error, not hidden."""
    rows: list[dict[str, Any]] = []
    try:
        import torch_pruning as tp
    except ImportError as exc:
        return [{"library": "torch-pruning", "error": f"not importable: {exc}"}]
    version = getattr(tp, "__version__", "?")
    imps = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "taylor": lambda: tp.importance.TaylorImportance(),
    }

    def run(name: str, ratio: float) -> nn.Module:
        model = copy.deepcopy(base).eval()
        ignored = [m for n, m in model.named_modules()
                   if n == "conv1" or n.endswith(".conv2") or isinstance(m, nn.Linear)]
        pruner = tp.pruner.MagnitudePruner(model, x, importance=imps[name](), pruning_ratio=ratio,
                                           ignored_layers=ignored, global_pruning=False)
        if name == "taylor":
            model.zero_grad()
            for images, labels in calib:
                nn.functional.cross_entropy(model(images), labels).backward()
        pruner.step()
        model.zero_grad()
        return model

    for name in imps:
        t0 = time.perf_counter()
        try:
            lo, hi = 0.0, 0.99
            best = None
            for _ in range(12):  # bisection on TP's per-layer channel ratio to hit the MACs target
                mid = (lo + hi) / 2
                model = run(name, mid)
                red = 1 - count(model, x).macs / base_macs
                if best is None or abs(red - TARGET) < abs(best[1] - TARGET):
                    best = (model, red, mid)
                if abs(red - TARGET) <= 0.005:
                    break
                lo, hi = (mid, hi) if red < TARGET else (lo, mid)
            model, red, ratio = best
            seconds = time.perf_counter() - t0
            c = count(model, x)
            for repair in ("none", "bn-recal"):
                m = copy.deepcopy(model)
                if repair == "bn-recal":
                    recalibrate_bn(m, recal, batches=len(recal))
                rows.append({"library": f"torch-pruning {version}", "criterion": name, "mode": "internal",
                             "repair": repair, "macs": c.macs, "params": c.params, "macs_reduction": red,
                             "tp_pruning_ratio": ratio, "seconds": round(seconds, 2), **accuracy(m, loaders)})
        except Exception as exc:  # record any Torch-Pruning failure honestly
            rows.append({"library": f"torch-pruning {version}", "criterion": name, "mode": "internal",
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criteria", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument("--jpeg-test-limit", type=int, default=0,
                        help="also evaluate on the first N JPEG test images (0: skip, 10000: all)")
    parser.add_argument("--calib-images", type=int, default=1024)
    parser.add_argument("--score-images", type=int, default=640)
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = SHARED / "weights" / "akamaster_resnet56-4bfd9763.th"
    if not weights.exists():
        print(f"skip: {weights} is absent (set PARE_SHARED)")
        return 0
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    base = create("resnet56").eval()
    info = load_checkpoint(base, weights)
    train = load_dataset(SHARED / "data" / "cifar10_jpeg", "train")
    calib = calibration_batches(train, args.calib_images, 128, seed=args.seed, normalization=NORM)
    score_data = [b for b in calib][: max(1, args.score_images // 128)]
    lossless = load_dataset(SHARED / "data" / "cifar10_official_truncated" / "cifar10_lossless_subset.npz", "test")
    loaders = {"lossless932": InMemoryLoader(lossless, 250, shuffle=False, normalization=NORM)}
    if args.jpeg_test_limit:
        jpeg_test = load_dataset(SHARED / "data" / "cifar10_jpeg", "test")
        from pare.data import ImageSubset

        n = min(args.jpeg_test_limit, len(jpeg_test))
        loaders[f"jpeg_test{n}"] = InMemoryLoader(ImageSubset(jpeg_test, torch.arange(n)), 250, shuffle=False,
                                                  normalization=NORM)
    x = torch.randn(1, 3, 32, 32)
    base_counts = count(base, x)
    rows: list[dict[str, Any]] = [{"library": "dense", "criterion": "-", "mode": "-", "repair": "none",
                                   "macs": base_counts.macs, "params": base_counts.params, "macs_reduction": 0.0,
                                   **accuracy(base, loaders)}]
    print(rows[0], flush=True)
    wanted = [c for c in args.criteria.split(",") if c] or [c.name for c in list_criteria()]
    for name in wanted:
        for internal in (True, False):
            mode = "internal" if internal else "grouped"
            try:
                res = prune(base, x, criterion=name, target=Budget(macs_reduction=TARGET), data=score_data,
                            internal_only=internal, seed=args.seed)
            except pare.PareError as exc:
                rows.append({"library": "pare", "criterion": name, "mode": mode, "error": str(exc)[:300]})
                print(rows[-1], flush=True)
                continue
            common = {"library": "pare", "criterion": name, "mode": mode, "macs": res.counts_after.macs,
                      "params": res.counts_after.params, "macs_reduction": res.macs_reduction}
            for repair in ("none", "bn-recal", "compensate+bn-recal"):
                m = copy.deepcopy(res.model)
                t0 = time.perf_counter()
                if repair != "none":
                    recalibrate_bn(m, calib, batches=len(calib))
                if repair == "compensate+bn-recal":
                    # Fit on the inputs of the recalibrated model (stale BN statistics would skew the fit),
                    # then recalibrate again for the new weights.
                    compensate(base, m, pare.trace(base, x), res.removals, calib, seed=args.seed)
                    recalibrate_bn(m, calib, batches=len(calib))
                seconds = sum(res.seconds.values()) + time.perf_counter() - t0
                rows.append({**common, "repair": repair, "seconds": round(seconds, 2), **accuracy(m, loaders)})
                print(rows[-1], flush=True)
    if not args.no_torch_pruning:
        rows.extend(tp_rows(base, x, score_data, calib, loaders, base_counts.macs))
    record = {
        "benchmark": "one-shot pruning, ResNet-56 (akamaster, option A), 50% MACs reduction, no fine-tuning",
        "seed": args.seed,
        "recipe": "none (one-shot)",
        "counter_convention": "macs (conv + linear MACs, per 32x32 image)",
        "baseline_checkpoint": {"path": str(weights.name), "sha256": info.get("sha256")},
        "data": {
            "scoring": f"{len(score_data) * 128} JPEG training images (seeded subset, no augmentation)",
            "bn_recalibration_and_compensation": f"{args.calib_images} JPEG training images (seed {args.seed})",
            "normalization": NORM,
            "test": list(loaders),
        },
        "residual_modes": {"internal": "block-internal conv1 channels only",
                           "grouped": "all groups, coupled residual channels removed together"},
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "threads": 1,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "oneshot.json").write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, list(loaders))
    return 0


def write_markdown(record: dict[str, Any], tests: list[str]) -> None:
    lines = [
        "# One-shot pruning: ResNet-56 at 50% MACs reduction (no fine-tuning)",
        "",
        f"Generated by `bench/oneshot.py` (git {record['git_commit'][:10]}, seed {record['seed']}, counter "
        f"{record['counter_convention']}). Checkpoint {record['baseline_checkpoint']['path']} "
        f"(sha256 {str(record['baseline_checkpoint']['sha256'])[:12]}...). Data: {record['data']}.",
        "Residual modes: internal = block-internal conv1 channels only; grouped = every group, coupled residual "
        "channels removed together (DepGraph-style). Reductions are computed from absolute counts.",
        "",
        "| library | criterion | mode | repair | MACs | params | MACs red. | " + " | ".join(f"top-1 {t}" for t in tests)
        + " | s |",
        "|---|---|---|---|---|---|---|" + "---|" * len(tests) + "---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['library']} | {r['criterion']} | {r['mode']} | error: {r['error']} |")
            continue
        accs = " | ".join(f"{r.get(t, float('nan')):.2f}" for t in tests)
        lines.append(f"| {r['library']} | {r['criterion']} | {r['mode']} | {r['repair']} | {r['macs']:,} | "
                     f"{r['params']:,} | {100 * r['macs_reduction']:.2f}% | {accs} | {r.get('seconds', '')} |")
    out = REPO / "docs" / "results" / "oneshot.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
