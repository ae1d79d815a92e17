"""Prune-then-fine-tune benchmark: the akamaster ResNet-56 at 50% MACs, every criterion under one budget.

Each row: prune (block-internal convs, ``internal_only``) to 50% MACs reduction (a row ``crit@uniform`` uses the
same keep ratio in every layer instead of the default global ranking), repair the one-shot model
(BN recalibration on 1024 training images, optionally least-squares compensation first), then fine-tune with
the same recipe for every row (default: 1 epoch on the CIFAR-10 JPEG training set minus a seeded 5000-image
validation split, pad-4 crop + flip, SGD cosine from 0.01; ``--distill-alpha`` adds knowledge distillation
from the dense model).
The validation split is used only for monitoring; the reported accuracy is the FINAL-epoch model's, on the
932 lossless official test images and the 10000-image JPEG test set. Torch-Pruning 1.6.1 L1 (same MACs, same
repair and fine-tuning) and the dense model fine-tuned under the same protocol are rows of the same run.

Rows are written to bench/results/finetune.json (and docs/results/finetune.md) as each finishes; a rerun with
the same configuration skips rows already present, and ``fit`` checkpoints under ``--work-dir`` every 50
steps, so a killed run resumes mid-epoch. Skips (exit 0) when /work/shared is absent.

    python bench/finetune.py [--rows tp-l1,fpgm,taylor,l1@uniform] [--epochs 1] [--recipe chip] [--lr 0.01]
    python bench/finetune.py --markdown-only   # rewrite docs/results/finetune.md from the JSON
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import git_commit, git_dirty  # noqa: E402  (bench/ is on sys.path when run as a script)

import pare  # noqa: E402
import pare.criteria  # noqa: E402  (registers the criteria)
from pare.allocate import Budget  # noqa: E402
from pare.compensate import compensate  # noqa: E402
from pare.count import count  # noqa: E402
from pare.criteria.base import list_criteria  # noqa: E402
from pare.data import ImageSubset, InMemoryLoader, calibration_batches, load_dataset, train_val_split  # noqa: E402
from pare.evaluate import evaluate, recalibrate_bn  # noqa: E402
from pare.io import load_checkpoint  # noqa: E402
from pare.models import create  # noqa: E402
from pare.prune import prune  # noqa: E402
from pare.train import Recipe, fit, get_recipe  # noqa: E402

SHARED = Path(os.environ.get("PARE_SHARED", REPO.parent / "shared"))
NORM = "imagenet"  # the akamaster checkpoints were trained with ImageNet mean/std (SOURCES.md)
TARGET = 0.5
TARGET_LOSSLESS = 91.5  # issue #5: best pare criterion after 1 epoch of fine-tuning, top-1 % on lossless932
DEFAULT_RESULTS = REPO / "bench" / "results" / "finetune.json"
RESULTS = DEFAULT_RESULTS  # --results redirects it; a JSON in bench/results/ gets docs/results/<same stem>.md
# Strongest one-shot criteria first (docs/results/oneshot.md, compensate+bn-recal, internal mode), so that a
# run cut short by the time budget still covers the rows that matter most.
PRIORITY = ("taylor", "fpgm", "l1", "chip")


def default_rows() -> list[str]:
    names = [c.name for c in list_criteria()]
    rest = [n for n in names if n not in PRIORITY]
    return ["tp-l1", *[n for n in PRIORITY if n in names], "dense", *rest]


def parse_row(row: str, criteria: Sequence[str]) -> tuple[str, str]:
    """``"taylor"`` -> ("taylor", "global"); ``"l1@uniform"`` -> ("l1", "uniform"); ``"tp-l1"`` and ``"dense"``
    -> (row, "-"). Raises ValueError for anything else."""
    name, at, allocation = row.partition("@")
    if name in ("tp-l1", "dense") and not at:
        return name, "-"
    if name in criteria and allocation in ("", "global", "uniform"):
        return name, allocation or "global"
    raise ValueError(row)


def invalid_rows(rows: Sequence[str], criteria: Sequence[str]) -> list[str]:
    bad = []
    for row in rows:
        try:
            parse_row(row, criteria)
        except ValueError:
            bad.append(row)
    return bad


def accuracy(model: nn.Module, loaders: dict[str, InMemoryLoader]) -> dict[str, float]:
    return {name: round(float(evaluate(model, loader, topk=(1,))["top1"]), 2) for name, loader in loaders.items()}


def tp_l1(base: nn.Module, x: torch.Tensor, base_macs: int) -> tuple[nn.Module, float, str]:
    """Torch-Pruning L1 on the block-internal convs (as ``tp_rows`` in bench/oneshot.py), bisecting its
    per-layer ratio to the MACs target. Returns (pruned model, MACs reduction, TP version)."""
    import torch_pruning as tp

    def run(ratio: float) -> nn.Module:
        model = copy.deepcopy(base).eval()
        ignored = [m for n, m in model.named_modules()
                   if n == "conv1" or n.endswith(".conv2") or isinstance(m, nn.Linear)]
        tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                                  ignored_layers=ignored, global_pruning=False).step()
        return model

    lo, hi, best = 0.0, 0.99, None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = run(mid)
        red = 1 - count(model, x).macs / base_macs
        if best is None or abs(red - TARGET) < abs(best[1] - TARGET):
            best = (model, red)
        if abs(red - TARGET) <= 0.005:
            break
        lo, hi = (mid, hi) if red < TARGET else (lo, mid)
    assert best is not None
    return best[0], best[1], str(getattr(tp, "__version__", "?"))


@contextmanager
def locked_results() -> Iterator[dict[str, Any]]:
    """Read-modify-write of the results JSON under an exclusive lock, so that two processes working on disjoint
    rows can share one file."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # The lock file lives in the temp dir, not next to the results, so it never ends up in the repository.
    with open(Path(tempfile.gettempdir()) / f"pare_{RESULTS.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        yield record
        tmp = RESULTS.with_name(f".{RESULTS.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, RESULTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="", help="comma-separated rows: tp-l1, dense, or criterion names, "
                                                    "optionally with @uniform or @global (default allocation) "
                                                    "(default: tp-l1, taylor, fpgm, l1, chip, dense, the rest)")
    parser.add_argument("--criteria", default="", help="only these pare criteria (plus tp-l1 and dense unless "
                                                        "--no-torch-pruning / --no-dense)")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--recipe", default="", help="a pare.train preset (e.g. chip) instead of the 1-epoch one")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--distill-alpha", type=float, default=0.0,
                        help="knowledge distillation from the dense model (e.g. 0.9); 0 (default) disables it")
    parser.add_argument("--distill-temperature", type=float, default=4.0)
    parser.add_argument("--start", choices=("bn-recal", "compensate+bn-recal"), default="compensate+bn-recal",
                        help="one-shot repair before fine-tuning (Torch-Pruning rows always use bn-recal)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--calib-images", type=int, default=1024)
    parser.add_argument("--score-images", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="smoke tests only: fine-tune on the first N training images (0: all)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="results JSON")
    parser.add_argument("--markdown-only", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--work-dir", default="/tmp/pare_finetune", help="fit checkpoints (resume mid-epoch)")
    args = parser.parse_args()
    global RESULTS
    RESULTS = Path(args.results).resolve()
    if args.markdown_only:
        with locked_results() as record:
            record["command"] = rerun_command(record)
            write_markdown(record)
        return 0
    torch.set_num_threads(args.threads)
    weights = SHARED / "weights" / "akamaster_resnet56-4bfd9763.th"
    if not weights.exists():
        print(f"skip: {weights} is absent (set PARE_SHARED)")
        return 0

    if args.recipe:
        recipe = get_recipe(args.recipe, seed=args.seed)
    else:
        # [design] One epoch from a repaired one-shot model: no warm-up (Recipe warm-up is whole epochs), cosine
        # from 0.01 (the CHIP / Torch-Pruning fine-tuning LR) to 0, wd 5e-4 as in the akamaster training.
        recipe = Recipe(name=f"finetune-{args.epochs}ep", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine", seed=args.seed)
    recipe = recipe.replace(distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature)
    config = {"recipe": recipe.to_dict(), "start": args.start, "val_size": args.val_size,
              "calib_images": args.calib_images, "score_images": args.score_images, "seed": args.seed,
              "target_macs_reduction": TARGET, "train_limit": args.train_limit}

    criteria_names = [c.name for c in list_criteria()]
    if args.rows:
        rows = [r for r in args.rows.split(",") if r]
    else:
        rows = default_rows()
        if args.criteria:
            keep = set(args.criteria.split(","))
            rows = [r for r in rows if r in ("tp-l1", "dense") or r in keep]
        if args.no_torch_pruning:
            rows.remove("tp-l1")
        if args.no_dense:
            rows.remove("dense")
    unknown = invalid_rows(rows, criteria_names)
    if unknown:
        parser.error(f"unknown rows {unknown}; known: tp-l1, dense, {', '.join(criteria_names)} "
                     "(criteria optionally with @uniform or @global)")

    with locked_results() as record:
        if record.get("config") not in (None, config):
            # A different protocol must not be mixed into one table: keep the old file aside.
            old = RESULTS.with_name(f"{RESULTS.stem}.{int(time.time())}.json")
            old.write_text(json.dumps(record, indent=2) + "\n")
            print(f"config changed: previous results moved to {old}", flush=True)
            record.clear()
        record.setdefault("rows", [])
        done = {r["row"] for r in record["rows"]}
    todo = [r for r in rows if r not in done]
    print(f"rows to run: {todo} (already done: {sorted(done)})", flush=True)
    if not todo:
        return 0

    torch.manual_seed(args.seed)
    base = create("resnet56").eval()
    info = load_checkpoint(base, weights)
    train_full = load_dataset(SHARED / "data" / "cifar10_jpeg", "train")
    train_idx, val_idx = train_val_split(len(train_full), val_size=args.val_size, seed=args.seed)
    if args.train_limit:
        train_idx = train_idx[: args.train_limit]
    train_set, val_set = ImageSubset(train_full, train_idx), ImageSubset(train_full, val_idx)
    calib = calibration_batches(train_set, args.calib_images, 128, seed=args.seed, normalization=NORM)
    score_data = calib[: max(1, args.score_images // 128)]
    lossless = load_dataset(SHARED / "data" / "cifar10_official_truncated" / "cifar10_lossless_subset.npz", "test")
    jpeg_test = load_dataset(SHARED / "data" / "cifar10_jpeg", "test")
    tests = {"lossless932": InMemoryLoader(lossless, 250, shuffle=False, normalization=NORM),
             f"jpeg_test{len(jpeg_test)}": InMemoryLoader(jpeg_test, 250, shuffle=False, normalization=NORM)}
    train_loader = InMemoryLoader(train_set, recipe.batch_size, shuffle=True, augment="cifar", normalization=NORM,
                                  seed=args.seed, drop_last=True)
    val_loader = InMemoryLoader(val_set, 250, shuffle=False, normalization=NORM)
    x = torch.randn(1, 3, 32, 32)
    base_counts = count(base, x)
    teacher = copy.deepcopy(base).eval() if recipe.distill_alpha > 0 else None
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)

    with locked_results() as record:
        record.update({
            "benchmark": "prune + fine-tune, ResNet-56 (akamaster, option A), 50% MACs reduction",
            "config": config,
            "seed": args.seed,
            "recipe": recipe.to_dict(),
            "counter_convention": "macs (conv + linear MACs, per 32x32 image, pare.count)",
            "baseline_checkpoint": {"path": weights.name, "sha256": info.get("sha256")},
            "baseline_counts": {"macs": base_counts.macs, "params": base_counts.params},
            "residual_handling": "internal: block-internal conv1 channels only (residual channels kept); "
                                 "Torch-Pruning: ignored_layers = stem conv, every block conv2 and the fc",
            "data": {
                "train": f"CIFAR-10 JPEG training set minus {len(val_idx)} held-out images "
                         f"({len(train_idx)} images, seed {args.seed}), pad-4 random crop + horizontal flip, "
                         f"{len(train_loader)} steps/epoch (drop_last)",
                "validation": f"{len(val_idx)} held-out JPEG training images: monitoring only, never selection",
                "scoring": f"{len(score_data) * 128} of the calibration images (no augmentation)",
                "bn_recalibration_and_compensation": f"{args.calib_images} training images (seed {args.seed})",
                "normalization": NORM,
                "test": {"lossless932": "932 lossless official CIFAR-10 test images",
                         f"jpeg_test{len(jpeg_test)}": "the JPEG CIFAR-10 test set"},
            },
            "device": args.device,
            "threads": args.threads,
            "torch": torch.__version__,
        })

    for row in todo:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"row": row, "seed": args.seed, "git_commit": git_commit(), "git_dirty": git_dirty()}
        try:
            if row == "dense":
                model, start = copy.deepcopy(base), "none"
                entry.update(library="dense", criterion="-", mode="-", allocation="-")
            elif row == "tp-l1":
                model, _, version = tp_l1(base, x, base_counts.macs)
                recalibrate_bn(model, calib, batches=len(calib))
                start = "bn-recal"
                entry.update(library=f"torch-pruning {version}", criterion="l1", mode="internal",
                             allocation="uniform (one pruning ratio per layer)")
            else:
                criterion, allocation = parse_row(row, criteria_names)
                res = prune(base, x, criterion=criterion, target=Budget(macs_reduction=TARGET), data=score_data,
                            allocation=allocation, internal_only=True, seed=args.seed)
                model, start = res.model, args.start
                recalibrate_bn(model, calib, batches=len(calib))
                if start == "compensate+bn-recal":
                    # Fit on the recalibrated model's inputs, then recalibrate again for the new weights.
                    compensate(base, model, pare.trace(base, x), res.removals, calib, seed=args.seed)
                    recalibrate_bn(model, calib, batches=len(calib))
                entry.update(library="pare", criterion=criterion, mode="internal", allocation=allocation)
            c = count(model, x)
            entry.update(start=start, macs=c.macs, params=c.params,
                         macs_reduction=round(1 - c.macs / base_counts.macs, 5),
                         params_reduction=round(1 - c.params / base_counts.params, 5),
                         before_finetune=accuracy(model, tests), prepare_seconds=round(time.perf_counter() - t0, 1))
            print(f"[{row}] before fine-tuning: {entry['before_finetune']}", flush=True)
            result = fit(model, train_loader, val_loader, recipe, teacher=teacher,
                         out_dir=Path(args.work_dir) / f"{row}-{recipe.name}-s{args.seed}", device=args.device,
                         progress=False, keep_best=False, checkpoint_every_steps=50)
            model.to("cpu")
            best = max(result.history, key=lambda h: h["val_acc"])
            entry.update(
                final_epoch=accuracy(model, tests),
                final_val_acc=round(100 * result.final_val_acc, 2),
                # Separately labelled: which epoch validation would pick; its test accuracy is not reported.
                best_epoch_on_val={"epoch": best["epoch"], "val_acc": round(100 * best["val_acc"], 2)},
                epoch_seconds=[round(h["seconds"], 1) for h in result.history],
                seconds=round(time.perf_counter() - t0, 1),
            )
        except (pare.PareError, ImportError, RuntimeError) as exc:  # recorded honestly, the run goes on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"[{row}] {entry}", flush=True)
        with locked_results() as record:
            record["rows"] = [r for r in record["rows"] if r["row"] != row] + [entry]
            record["command"] = rerun_command(record)  # bench/make_docs.py quotes it
            if RESULTS.parent == DEFAULT_RESULTS.parent:
                write_markdown(record)
    return 0


def rerun_command(record: dict[str, Any]) -> str:
    """The command that reproduces every row of ``record`` (into the same results file)."""
    r0 = record["recipe"]
    return ("python bench/finetune.py --rows " + ",".join(r["row"] for r in record["rows"])
            + ("" if r0["lr"] == 0.01 else f" --lr {r0['lr']}")
            + ("" if r0["distill_alpha"] == 0 else f" --distill-alpha {r0['distill_alpha']}")
            + ("" if record["config"]["start"] == "compensate+bn-recal" else f" --start {record['config']['start']}")
            + ("" if RESULTS == DEFAULT_RESULTS else f" --results {RESULTS.relative_to(REPO)}")
            + ("" if r0["name"] == "finetune-1ep" else f"  # recipe {r0['name']}"))


def write_markdown(record: dict[str, Any]) -> None:
    tests = list(record["data"]["test"])
    r0 = record["recipe"]
    lines = [
        "# Prune + fine-tune: ResNet-56 at 50% MACs reduction",
        "",
        f"Generated by `bench/finetune.py`; numbers are in `{RESULTS.relative_to(REPO)}`. Command (the rows of this "
        "table; rows may be split over concurrent processes with disjoint `--rows`, which share the JSON under a "
        "file lock):",
        "",
        "    " + rerun_command(record),
        "",
        f"Checkpoint {record['baseline_checkpoint']['path']} (sha256 "
        f"{str(record['baseline_checkpoint']['sha256'])[:12]}...), counter {record['counter_convention']}, "
        f"seed {record['seed']}, device {record['device']} ({record['threads']} thread(s)).",
        f"Recipe `{r0['name']}`: {r0['epochs']} epoch(s), batch {r0['batch_size']}, SGD lr {r0['lr']} "
        f"({r0['schedule']}, warm-up {r0['warmup_epochs']}), momentum {r0['momentum']}, nesterov {r0['nesterov']}, "
        f"wd {r0['weight_decay']}, "
        + (f"distillation from the dense model alpha {r0['distill_alpha']} T {r0['distill_temperature']}."
           if r0["distill_alpha"] > 0 else "no distillation."),
        f"Train: {record['data']['train']}. Validation: {record['data']['validation']}.",
        f"Residual handling: {record['residual_handling']}.",
        "Accuracies are of the FINAL-epoch weights (top-1 %); 'start' is the one-shot repair fine-tuning began "
        "from; reductions are computed from absolute counts.",
        "",
        "Rows run: " + ", ".join(r["row"] for r in record["rows"]) + ". Not run (time budget of the 2-core "
        "machine): " + (", ".join(r for r in default_rows() if r not in {x["row"] for x in record["rows"]}) or "none")
        + ".",
        f"One seed; the LR ({r0['lr']}) was fixed before the run (the CHIP / Torch-Pruning presets use 0.01; "
        "0.005 was chosen in advance for starts that are already repaired), not tuned on the test or the "
        "validation split. Best-epoch test accuracies are not reported; `best_epoch_on_val` in the JSON names the "
        "epoch validation would pick and its validation accuracy.",
        "",
        "| library | criterion | allocation | start | MACs | MACs red. | params | "
        + " | ".join(f"one-shot {t}" for t in tests) + " | " + " | ".join(f"**final {t}**" for t in tests)
        + " | val (final) | s/epoch (wall, shared 2-core CPU) |",
        "|---|---|---|---|---|---|---|" + "---|" * (2 * len(tests)) + "---|---|",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r.get('library', r['row'])} | {r.get('criterion', r['row'])} | "
                         f"{r.get('allocation', '-')} | error: {r['error']} |")
            continue
        before = " | ".join(f"{r['before_finetune'][t]:.2f}" for t in tests)
        final = " | ".join(f"**{r['final_epoch'][t]:.2f}**" for t in tests)
        lines.append(f"| {r['library']} | {r['criterion']} | {r.get('allocation', '-')} | {r['start']} | "
                     f"{r['macs']:,} | "
                     f"{100 * r['macs_reduction']:.2f}% | {r['params']:,} | {before} | {final} | "
                     f"{r['final_val_acc']:.2f} | {', '.join(str(s) for s in r['epoch_seconds'])} |")
    pare_rows = [r for r in record["rows"] if r.get("library") == "pare" and "final_epoch" in r]
    if pare_rows and "lossless932" in tests:
        best = max(pare_rows, key=lambda r: r["final_epoch"]["lossless932"])
        acc = best["final_epoch"]["lossless932"]
        lines += ["", f"Issue #5 target (best pare criterion >= {TARGET_LOSSLESS}% on lossless932 after the 1-epoch "
                      f"fine-tune): {'met' if acc >= TARGET_LOSSLESS else 'not met'}; best pare row: "
                      f"{best['row']} at {acc:.2f}%."]
    markdown = REPO / "docs" / "results" / f"{RESULTS.stem}.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
