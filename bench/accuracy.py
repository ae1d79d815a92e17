"""Accuracy at equal treatment: pare's pipeline against Torch-Pruning, choices made on a validation split.

Protocol (issue "Win on accuracy honestly"):

* Data: the CIFAR-10 JPEG training set is split (seeded) into 45,000 fitting images and 5,000 held-out validation
  images. Calibration (scoring, BN recalibration, compensation) draws from the fitting part only. Every choice
  (criterion, allocation, repair) is made on the validation split; the test sets (the 932 lossless official test
  images, the 10,000 JPEG test images) are evaluated once, for the chosen configuration and the peer, and reported
  beside the full validation table.
* Equal treatment: Torch-Pruning (TP) prunes the same block-internal channels (``internal_only``; TP's
  ``ignored_layers`` are every other conv/linear), with its per-layer ratio (``allocation="uniform"``), the same
  ``round_to`` and the same MACs budget (pare's counter, bisection on TP's ratio); its pruned model then gets exactly
  the repair pare's pipeline applies (BN recalibration, least-squares compensation) through pare's public functions
  (:func:`pare.foreign.infer_removals` maps TP's model onto pare's groups first).
* Records: every row carries the commit it ran at (the script refuses a dirty tree, untracked files included, unless
  ``--allow-dirty``, which marks the row), the seed, the data hash and the counting convention.

Stages (each writes its own JSON in bench/results/):

    python bench/accuracy.py select            # ResNet-20: criteria x allocations on validation -> accuracy_select.json
    python bench/accuracy.py select --model resnet56 --criteria l1,recon --allocations sensitivity \
        --results accuracy_select_resnet56     # the best ResNet-20 rows on ResNet-56's validation split
    python bench/accuracy.py choose            # one choice from both grids -> accuracy_choice.json
    python bench/accuracy.py oneshot           # 3 models x 3 seeds: pare default vs TP L1, same repair
    python bench/accuracy.py finetune          # the same starts, 1 epoch of the same recipe

Skips (exit 0) when the shared data are absent.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import environment, git_commit, git_dirty  # noqa: E402  (bench/ is on sys.path as a script)

import pare  # noqa: E402
from pare.allocate import Budget  # noqa: E402
from pare.baselines.torch_pruning import prune_with_torch_pruning  # noqa: E402
from pare.compensate import compensate  # noqa: E402
from pare.config import PruneConfig, RepairConfig  # noqa: E402
from pare.count import count  # noqa: E402
from pare.data import ImageSubset, InMemoryLoader, calibration_batches, load_dataset  # noqa: E402
from pare.data.splits import train_val_split  # noqa: E402
from pare.evaluate import evaluate, recalibrate_bn  # noqa: E402
from pare.foreign import infer_removals  # noqa: E402
from pare.io import load_checkpoint  # noqa: E402
from pare.models import create  # noqa: E402

SHARED = Path(os.environ.get("PARE_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "bench" / "results"
NORM = "imagenet"  # the akamaster checkpoints were trained with ImageNet mean/std (data/SOURCES.md)
WEIGHTS = {
    "resnet20": "akamaster_resnet20-12fca82f.th",
    "resnet32": "akamaster_resnet32-d509ac18.th",
    "resnet56": "akamaster_resnet56-4bfd9763.th",
}
TARGET = 0.5
VAL_SIZE = 5000
CALIB_IMAGES = 1024
SCORE_IMAGES = 640
CONVENTION = "macs"
SELECT_CRITERIA = ("l1", "l2", "fpgm", "taylor", "chip", "hrank", "recon")
ALLOCATIONS = ("global", "uniform", "sensitivity")
SELECT_JSON = RESULTS / "accuracy_select.json"
SELECT_JSONS = ("accuracy_select.json", "accuracy_select_resnet56.json")  # the validation grids the choice reads
CHOICE_JSON = RESULTS / "accuracy_choice.json"
CHOICE_KEYS = ("criterion", "allocation", "internal_only", "round_to", "repair")


@dataclass
class Setting:
    """Everything one row is run against (model, data, calibration), built once per (model, seed)."""

    name: str
    base: nn.Module
    x: torch.Tensor
    calib: list[tuple[torch.Tensor, torch.Tensor]]
    score: list[tuple[torch.Tensor, torch.Tensor]]
    val: InMemoryLoader
    fit_set: ImageSubset
    tests: dict[str, InMemoryLoader]
    data_record: dict[str, Any]
    seed: int


def tensor_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def setting(model_name: str, seed: int, tests: bool) -> Setting:
    """The model with its pretrained weights, the seeded split, the calibration sample, the loaders."""
    base = create(model_name).eval()
    load_checkpoint(base, SHARED / "weights" / WEIGHTS[model_name])
    train = load_dataset(SHARED / "data" / "cifar10_jpeg", "train")
    # The validation split is fixed (seed 0) across seeds, so that a choice made on it applies to every seed; the
    # seed changes the calibration sample (and everything drawn from it).
    fit_idx, val_idx = train_val_split(len(train), val_size=VAL_SIZE, seed=0)
    fit_set, val_set = ImageSubset(train, fit_idx), ImageSubset(train, val_idx)
    calib = calibration_batches(fit_set, CALIB_IMAGES, 128, seed=seed, normalization=NORM)
    loaders: dict[str, InMemoryLoader] = {}
    record: dict[str, Any] = {
        "train": "CIFAR-10 JPEG training set (../shared/data/cifar10_jpeg)",
        "fit_images": len(fit_idx),
        "validation": f"{len(val_idx)} held-out training images (split seed 0), used for every choice",
        "val_sha256_16": tensor_hash(train.images[val_idx], train.labels[val_idx]),
        "calibration": f"{CALIB_IMAGES} fitting images (seed {seed}); scoring uses the first {SCORE_IMAGES}",
        "normalization": NORM,
    }
    if tests:
        lossless = load_dataset(SHARED / "data" / "cifar10_official_truncated" / "cifar10_lossless_subset.npz", "test")
        jpeg = load_dataset(SHARED / "data" / "cifar10_jpeg", "test")
        loaders = {"lossless932": InMemoryLoader(lossless, 250, shuffle=False, normalization=NORM),
                   "jpeg_test": InMemoryLoader(jpeg, 250, shuffle=False, normalization=NORM)}
        record["tests"] = {"lossless932": f"932 lossless official test images, sha256/16 "
                                          f"{tensor_hash(lossless.images, lossless.labels)}",
                           "jpeg_test": f"{len(jpeg)} JPEG test images, sha256/16 "
                                        f"{tensor_hash(jpeg.images, jpeg.labels)}"}
    return Setting(model_name, base, torch.randn(1, 3, 32, 32), calib, calib[: SCORE_IMAGES // 128],
                   InMemoryLoader(val_set, 500, shuffle=False, normalization=NORM), fit_set, loaders, record, seed)


def top1(model: nn.Module, loader: InMemoryLoader) -> float:
    """Top-1 as a fraction (what pare.evaluate returns)."""
    return round(float(evaluate(model, loader, topk=(1,))["top1"]), 5)


def run_row(s: Setting, row: dict[str, Any], after_recal: Callable[[nn.Module], dict[str, Any]] | None = None
            ) -> tuple[nn.Module, dict[str, Any]]:
    """Prune with ``row['engine']`` and repair with ``row['repair']``; returns the model and its figures.
    ``after_recal`` measures the model between BN recalibration and compensation (the "bn-recal only" ablation of
    the same pruned model), its figures stored with the prefix ``bn_recal_only_``."""
    t0 = time.perf_counter()
    target = Budget(macs_reduction=TARGET)
    if row["engine"] == "torch-pruning":
        pruned = prune_with_torch_pruning(s.base, s.x, criterion=row["criterion"], target=target,
                                          round_to=row["round_to"], allocation=row["allocation"],
                                          internal_only=row["internal_only"], data=s.score, seed=s.seed,
                                          tolerance=0.01)
        graph, removals = infer_removals(s.base, pruned, s.x)
    else:
        # The repair runs below on the larger calibration set, for both engines alike: none inside prune.
        res = pare.prune(s.base, s.x, criterion=row["criterion"], target=target, data=s.score,
                         config=PruneConfig(allocation=row["allocation"], internal_only=row["internal_only"],
                                            round_to=row["round_to"], seed=s.seed),
                         repair=RepairConfig(recalibrate=False, compensate=False))
        pruned, removals = res.model, res.removals
        graph = pare.trace(s.base, s.x)
    extra: dict[str, Any] = {}
    if row["repair"] in ("bn-recal", "bn-recal+compensate"):
        recalibrate_bn(pruned, s.calib, batches=len(s.calib))
        if after_recal is not None and row["repair"] != "bn-recal":
            extra.update({f"bn_recal_only_{k}": v for k, v in after_recal(pruned).items()})
    if row["repair"] == "bn-recal+compensate":
        compensate(s.base, pruned, graph, removals, s.calib, seed=s.seed)
    c, dense = count(pruned, s.x, CONVENTION), count(s.base, s.x, CONVENTION)
    return pruned, {"macs": c.macs, "params": c.params, "macs_reduction": round(1 - c.macs / dense.macs, 5),
                    "params_reduction": round(1 - c.params / dense.params, 5),
                    "prune_repair_seconds": round(time.perf_counter() - t0, 1), **extra}


def provenance(allow_dirty: bool) -> dict[str, Any]:
    dirty = git_dirty(untracked=True)
    if dirty and not allow_dirty:
        sys.exit("accuracy.py: the tree has uncommitted or untracked files; commit first (or --allow-dirty, "
                 "which marks every row)")
    return {"git_commit": git_commit(), "git_dirty": dirty}


def write(name: str, record: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def header(stage: str, argv: Sequence[str], prov: dict[str, Any], s: Setting) -> dict[str, Any]:
    return {"benchmark": f"accuracy protocol: {stage}", "command": "python bench/accuracy.py " + " ".join(argv),
            "target_macs_reduction": TARGET, "counter_convention": f"{CONVENTION} (pare.count, 1x3x32x32)",
            "data": s.data_record, **prov, **environment(), "threads": torch.get_num_threads()}


def stage_select(args: argparse.Namespace, prov: dict[str, Any]) -> None:
    s = setting(args.model, 0, tests=False)
    record = header("select", sys.argv[1:], prov, s)
    record.update(model=args.model, seed=0, choice_rule="highest validation top-1 (ties: first in table order)",
                  rows=[{"engine": "dense", "val_top1": top1(s.base, s.val)}])
    print(record["rows"][0], flush=True)
    for crit in args.criteria.split(","):
        for alloc in args.allocations.split(","):
            row = {"engine": "pare", "criterion": crit, "allocation": alloc, "internal_only": True, "round_to": 1,
                   "repair": args.repair}
            try:
                model, figures = run_row(s, row)
                row.update(figures, val_top1=top1(model, s.val))
            except pare.PareError as exc:  # recorded, not hidden
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            record["rows"].append(row)
            print(row, flush=True)
            write(args.results or "accuracy_select", record)
    ok = [r for r in record["rows"] if r["engine"] == "pare" and "val_top1" in r]
    best = max(ok, key=lambda r: r["val_top1"])
    record["choice"] = {k: best[k] for k in ("criterion", "allocation", "internal_only", "round_to", "repair")}
    write(args.results or "accuracy_select", record)
    print("choice:", record["choice"], flush=True)


def default_row() -> dict[str, Any]:
    """pare's default pipeline: the configuration the choose stage picked from the validation grids (``choice``
    in bench/results/accuracy_choice.json; tests/test_defaults.py checks that pare's defaults are it)."""
    if not CHOICE_JSON.exists():
        sys.exit(f"accuracy.py: {CHOICE_JSON.name} is missing: run the select and choose stages first")
    choice = json.loads(CHOICE_JSON.read_text())["choice"]
    return {"engine": "pare", **choice}


def stage_choose(args: argparse.Namespace, prov: dict[str, Any]) -> None:
    """One choice from every validation grid: among the configurations measured on every model, the highest
    mean validation top-1 over the models (ties: the first in the first grid's order). Reads only validation
    figures."""
    grids = []
    for name in SELECT_JSONS:
        path = RESULTS / name
        if not path.exists():
            sys.exit(f"accuracy.py: {name} is missing: run its select stage first")
        grids.append(json.loads(path.read_text()))
    per_model = [{tuple(r[k] for k in CHOICE_KEYS): r["val_top1"] for r in g["rows"]
                  if r.get("engine") == "pare" and "val_top1" in r} for g in grids]
    common = [key for key in per_model[0] if all(key in m for m in per_model[1:])]
    means = {key: statistics.fmean(m[key] for m in per_model) for key in common}
    best = max(common, key=lambda key: means[key])
    record = {"benchmark": "accuracy protocol: choose", "command": "python bench/accuracy.py choose", **prov,
              "rule": "highest mean validation top-1 over the models of every grid, among the configurations "
                      "measured on all of them",
              "grids": {name: g["model"] for name, g in zip(SELECT_JSONS, grids)},
              "candidates": [{**dict(zip(CHOICE_KEYS, key)), "mean_val_top1": round(means[key], 5),
                              **{f"val_top1_{g['model']}": m[key] for g, m in zip(grids, per_model)}}
                             for key in common],
              "choice": dict(zip(CHOICE_KEYS, best))}
    write("accuracy_choice", record)
    print("choice:", record["choice"], flush=True)


def peer_row(repair: str) -> dict[str, Any]:
    """Torch-Pruning L1 with pare's treatment: block-internal channels, per-layer ratio, the same repair."""
    return {"engine": "torch-pruning", "criterion": "l1", "allocation": "uniform", "internal_only": True,
            "round_to": 1, "repair": repair}


def summarize(rows: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Mean and spread (sample standard deviation) of ``key`` over seeds, per (model, label)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if key in r:
            groups.setdefault((r["model"], r["label"]), []).append(r[key])
    return {f"{m} | {label}": {"mean": round(statistics.fmean(v), 5), "sd": round(statistics.stdev(v), 5)
                               if len(v) > 1 else None, "n": len(v)} for (m, label), v in groups.items()}


def stage_oneshot(args: argparse.Namespace, prov: dict[str, Any]) -> None:
    name = args.results or "accuracy_oneshot"
    record: dict[str, Any] = {}
    labels = {"pare default": default_row(), "torch-pruning l1, same repair": peer_row(default_row()["repair"])}
    rows: list[dict[str, Any]] = []
    if args.append and (RESULTS / f"{name}.json").exists():
        # More seeds or models for the same protocol: the earlier rows stay, each with the commit it ran at.
        record = json.loads((RESULTS / f"{name}.json").read_text())
        if record.get("default") != default_row():
            sys.exit(f"accuracy.py: {name}.json was made with another default pipeline; not appending")
        rows = record["rows"]
        for r in rows:
            r.setdefault("git_commit", record["git_commit"])
            r.setdefault("git_dirty", record["git_dirty"])
        record["commands"] = [*record.get("commands", [record["command"]]),
                              "python bench/accuracy.py " + " ".join(sys.argv[1:])]
    # Seeds outer: every model gets its first seed before any model gets its second.
    for seed in [int(v) for v in args.seeds.split(",")]:
        for model_name in args.models.split(","):
            s = setting(model_name, seed, tests=True)
            if not record:
                record = header("oneshot", sys.argv[1:], prov, s)
                record.update(default=default_row(), selected_by="bench/results/accuracy_choice.json (choice)",
                              rows=rows)
            dense = {"model": model_name, "seed": seed, "label": "dense", "engine": "dense", **prov,
                     "val_top1": top1(s.base, s.val), **{f"{k}_top1": top1(s.base, v) for k, v in s.tests.items()}}
            rows.append(dense)
            print(dense, flush=True)
            for label, cfg in labels.items():
                row = {"model": model_name, "seed": seed, "label": label, **cfg, **prov}

                def ablation(m: nn.Module, s: Setting = s) -> dict[str, Any]:
                    return {"val_top1": top1(m, s.val), "lossless932_top1": top1(m, s.tests["lossless932"])}

                try:
                    model, figures = run_row(s, row, ablation if args.ablation else None)
                    row.update(figures, val_top1=top1(model, s.val),
                               **{f"{k}_top1": top1(model, v) for k, v in s.tests.items()})
                except (pare.PareError, RuntimeError) as exc:  # recorded, not hidden
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                print(row, flush=True)
                record["summary"] = {k: summarize(rows, k) for k in (
                    "val_top1", "lossless932_top1", "jpeg_test_top1", "bn_recal_only_val_top1",
                    "bn_recal_only_lossless932_top1")}
                write(name, record)


def stage_finetune(args: argparse.Namespace, prov: dict[str, Any]) -> None:
    """The one-shot rows' starts, then the same recipe for every row (and for the dense model)."""
    from pare.train import Recipe, fit

    name = args.results or "accuracy_finetune"
    # [design] One epoch from the repaired model, fixed in advance (not tuned on any split): cosine from 0.005 (the
    # learning rate the earlier fine-tuning benchmark fixed before its runs) to 0, SGD with Nesterov momentum 0.9,
    # weight decay 5e-4 as in the akamaster training, batch 128, pad-4 crop + flip.
    labels = {"pare default": default_row(), "torch-pruning l1, same repair": peer_row(default_row()["repair"])}
    if args.dense_finetune:
        labels["dense"] = {"engine": "dense"}
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    for model_name in args.models.split(","):
        for seed in [int(v) for v in args.seeds.split(",")]:
            s = setting(model_name, seed, tests=True)
            recipe = Recipe(name="finetune-1ep", epochs=args.epochs, batch_size=128, lr=args.lr, momentum=0.9,
                            nesterov=True, weight_decay=5e-4, schedule="cosine", seed=seed)
            if not record:
                record = header("finetune", sys.argv[1:], prov, s)
                record.update(default=default_row(), recipe=recipe.to_dict(), rows=rows)
            train = InMemoryLoader(s.fit_set, recipe.batch_size, shuffle=True, augment="cifar", normalization=NORM,
                                   seed=seed, drop_last=True)
            if args.train_limit:
                train = _Limited(train, args.train_limit)
            for label, cfg in labels.items():
                row = {"model": model_name, "seed": seed, "label": label, **cfg}
                t0 = time.perf_counter()
                try:
                    if cfg["engine"] == "dense":
                        model = copy.deepcopy(s.base)
                    else:
                        model, figures = run_row(s, row)
                        row.update(figures)
                    row["start_val_top1"] = top1(model, s.val)
                    result = fit(model, train, s.val, recipe, progress=False, resume=False)
                    model.eval()
                    row.update(val_top1=top1(model, s.val), **{f"{k}_top1": top1(model, v) for k, v in s.tests.items()},
                               final_val_top1_trainer=round(float(result.final_val_acc), 5),
                               seconds=round(time.perf_counter() - t0, 1))
                except (pare.PareError, RuntimeError) as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                print(row, flush=True)
                record["summary"] = {k: summarize(rows, k) for k in ("val_top1", "lossless932_top1",
                                                                       "jpeg_test_top1")}
                write(name, record)


class _Limited:
    """The first ``n`` batches of a loader per epoch (the CPU smoke run of the full protocol)."""

    def __init__(self, loader: InMemoryLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("select", "choose", "oneshot", "finetune"))
    parser.add_argument("--model", default="resnet20", help="select: the model the choice is made on (the cheapest "
                        "of the three, so that the choice is not tuned on the headline model)")
    parser.add_argument("--criteria", default=",".join(SELECT_CRITERIA))
    parser.add_argument("--allocations", default=",".join(ALLOCATIONS))
    parser.add_argument("--repair", default="bn-recal+compensate")
    parser.add_argument("--models", default="resnet20,resnet32,resnet56")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ablation", action="store_true",
                        help="oneshot: also measure each row after BN recalibration, before compensation")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--train-limit", type=int, default=0, help="finetune: batches per epoch (0: all)")
    parser.add_argument("--dense-finetune", action="store_true", help="finetune: also the dense model, same recipe")
    parser.add_argument("--append", action="store_true",
                        help="oneshot: add rows to the existing JSON of the same default pipeline")
    parser.add_argument("--results", default="", help="JSON name in bench/results (default: accuracy_<stage>)")
    parser.add_argument("--allow-dirty", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not (SHARED / "weights").is_dir():
        print(f"skip: {SHARED} is absent (set PARE_SHARED)")
        return 0
    torch.set_num_threads(args.threads)
    prov = provenance(args.allow_dirty)
    if args.stage == "select":
        stage_select(args, prov)
    elif args.stage == "choose":
        stage_choose(args, prov)
    elif args.stage == "oneshot":
        stage_oneshot(args, prov)
    else:
        stage_finetune(args, prov)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
