"""``pare demo``: train the small CNN on scikit-learn's bundled digits, prune a copy with every registered
criterion to the same MACs budget, fine-tune each alike, and report accuracy, counts and latency.

No download: the digits (1,797 8x8 images) ship with scikit-learn. The whole run takes well under a minute on two
shared CPU cores (measured in docs/cli.md); one torch thread, since for a model this small more threads only add
synchronisation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pare.allocate.budget import Budget
from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand, positive_int
from pare.config import PipelineConfig, PruneConfig
from pare.train import Recipe

NAME = "demo"
EPILOG = """\
examples:
  pare demo                          # writes ./pare-demo/{report.md,metrics.json,*.png,models/}
  pare demo --out /tmp/demo --seed 1
  pare demo --quick --json           # a few seconds: 2 epochs + 1 fine-tune epoch (smoke test, not a result)

What it does: small_cnn is trained --epochs epochs on 85% of the digits training split (15% held out for
validation), then every criterion from 'pare criteria' prunes a copy to --reduce-macs of its MACs (global
allocation; data-driven criteria score on calibration images from the training split; BN statistics are
recalibrated for all), and each pruned copy is fine-tuned --finetune-epochs epochs with one recipe. The table
gives the test top-1 before and after fine-tuning (final-epoch weights), MACs, params and the measured latency.
"""

DEMO_MODEL = "small_cnn"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="zero-download demo: every criterion on digits (under a minute)",
                            description="Train a small CNN on scikit-learn's digits, prune it with every criterion "
                            "to the same MACs budget, fine-tune alike, compare.", epilog=EPILOG)
    parser.add_argument("--out", default="pare-demo", metavar="DIR",
                        help="output folder (the demo may overwrite its own earlier output there)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and training")
    parser.add_argument("--epochs", type=positive_int, default=15, metavar="N",
                        help="training epochs of the dense model")
    parser.add_argument("--finetune-epochs", type=positive_int, default=3, metavar="N",
                        help="fine-tuning epochs of every pruned model")
    parser.add_argument("--reduce-macs", type=common.fraction, default=0.5, metavar="F",
                        help="fraction of MACs every criterion removes")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N", help="torch intra-op threads")
    parser.add_argument("--latency-batch", type=positive_int, default=256, metavar="N",
                        help="batch size for the latency column (default 256: at batch 1 an 8x8 model is all call "
                             "overhead and no channel count shows)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test mode: 2 training epochs, 1 fine-tune epoch, fewer latency runs")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out that is not a demo output")
    return parser


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import torch

    t_start = time.perf_counter()
    out = common.prepare_out_dir(args.out, overwrite=args.overwrite, own_kind="demo")
    (out / "models").mkdir(exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args, console, argv, out, t_start)
    finally:
        torch.set_num_threads(threads_before)


def demo_config(args: argparse.Namespace) -> tuple[PipelineConfig, Recipe, Recipe]:
    """The pipeline configuration every demo row shares (the criterion differs per row), with its dense-training
    and fine-tuning recipes."""
    from pare.config import DataConfig, EvalConfig, FinetuneConfig, ModelConfig, PipelineConfig, RepairConfig

    epochs, ft_epochs = (2, 1) if args.quick else (args.epochs, args.finetune_epochs)
    train = Recipe(name="demo-train", epochs=epochs, batch_size=64, lr=0.1, weight_decay=5e-4, schedule="cosine",
                   seed=args.seed)
    finetune = Recipe(name="demo-finetune", epochs=ft_epochs, batch_size=64, lr=0.01, weight_decay=5e-4,
                      schedule="cosine", seed=args.seed)
    config = PipelineConfig(
        model=ModelConfig(name=DEMO_MODEL, init_seed=args.seed, train=train),
        data=DataConfig(path="digits", val_fraction=0.15, calib_images=256, calib_batch_size=128, seed=args.seed),
        target=Budget(macs_reduction=args.reduce_macs),
        prune=PruneConfig(seed=args.seed),
        repair=RepairConfig(recalibrate=True),  # BN statistics recalibrated for every criterion
        finetune=FinetuneConfig(recipe=finetune),
        eval=EvalConfig(splits=("test",), dense=False),
    )
    return config, train, finetune


def _demo(args: argparse.Namespace, console: Console, argv: list[str], out: Path, t_start: float) -> dict[str, Any]:
    import dataclasses

    import torch

    from pare import report
    from pare.count import count
    from pare.criteria.base import list_criteria
    from pare.io import save
    from pare.latency import compare_latency
    from pare.pipeline import prepare, run
    from pare.pipeline.stages import evaluate_splits

    base, train_recipe, ft_recipe = demo_config(args)
    latency_runs = 10 if args.quick else 60
    seconds: dict[str, float] = {}

    # ------------------------------------------------------------------------------------- dense model
    console.info(f"training {DEMO_MODEL} on digits for {train_recipe.epochs} epochs")
    t0 = time.perf_counter()
    loaded, data = prepare(base, progress=console.progress)
    seconds["train_dense"] = time.perf_counter() - t0
    dense = loaded.model
    shape = data.input_size or (1, 8, 8)  # digits are 8x8 grey images
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    dense_counts = count(dense, example)
    dense_top1 = float(evaluate_splits(dense, data, base.eval, "cpu")["test"]["top1"])  # type: ignore[arg-type]
    norm = data.normalization
    save(dense, out / "models" / "dense.safetensors",
         metadata={"input_shape": list(shape), "normalization": norm.to_dict(), "seed": args.seed})
    rows: list[dict[str, Any]] = [{
        "name": "dense", "top1_before_finetune": None, "top1": dense_top1, "macs": dense_counts.macs,
        "macs_reduction": 0.0, "params": dense_counts.params, "seconds": seconds["train_dense"],
        "best_val_top1": (loaded.train_record or {}).get("best_val_top1"),
    }]
    widths = {"dense": report.layer_widths(dense_counts)}
    models = {"dense": dense}
    notes = []

    # ------------------------------------------------------------------------------ every criterion
    criteria = [c.name for c in list_criteria()]
    console.info(f"pruning to -{100 * args.reduce_macs:.0f}% MACs with {len(criteria)} criteria, fine-tuning each "
                 f"{ft_recipe.epochs} epoch(s)")
    t_all = time.perf_counter()
    for name in console.bar(criteria, desc="criteria"):
        t0 = time.perf_counter()
        options: dict[str, Any] = {}
        if name == "similarity":
            # Its default skips residual-sum groups, which would leave the stem group unscored; cluster those
            # on their first producer so that every criterion may prune the same groups.
            options = {"residual": "first"}
            notes.append("similarity runs with residual='first' (its default 'skip' leaves residual-sum groups "
                         "unpruned)")
        config = dataclasses.replace(base, criterion=name, criterion_options=options)
        result = run(config, model=loaded, data=data)
        pruned = result.model
        last = result.prune[-1]
        save(pruned, out / "models" / f"{name}.safetensors",
             metadata={"criterion": name, "budget": base.target.describe(), "input_shape": list(shape),
                       "normalization": norm.to_dict(), "dense_model": dense.pare_zoo, "seed": args.seed})
        rows.append({
            "name": name, "top1_before_finetune": result.top1("pruned"), "top1": result.top1("finetuned"),
            "macs": last.counts_after.macs, "macs_reduction": last.macs_reduction,
            "params": last.counts_after.params, "seconds": time.perf_counter() - t0,
            "best_val_top1": (result.finetune or {}).get("best_val_top1"), "criterion_options": options,
            "config": config.to_dict(),
        })
        widths[name] = report.layer_widths(last.counts_after)
        models[name] = pruned.eval()
    seconds["prune_and_finetune"] = time.perf_counter() - t_all

    # ----------------------------------------------------------------------------------------- latency
    console.info("measuring latency of all models (interleaved rounds)")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    timing_batch = torch.randn(args.latency_batch, *example.shape[1:], generator=gen)
    measured = compare_latency({k: m.eval() for k, m in models.items()}, timing_batch, runs=latency_runs, warmup=5,
                               rounds=5, threads=args.threads)
    for row in rows:
        row["latency"] = measured[row["name"]].to_dict()
    seconds["latency"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    record: dict[str, Any] = {
        "kind": "demo",
        "command": common.command_line(argv),
        "setup": {
            "data": "scikit-learn digits (seeded 80/20 train/test split)", "model": DEMO_MODEL,
            "train_images": len(data.train or []) + len(data.val or []), "val_images": len(data.val or []),
            "test_images": len(data.tests["test"]), "epochs": train_recipe.epochs,
            "finetune_epochs": ft_recipe.epochs, "target_macs_reduction": args.reduce_macs,
            "calib_images": sum(len(b[1]) for b in data.calib or []), "latency_batch": args.latency_batch,
            "latency_threads": args.threads,
            "latency_runs": latency_runs, "quick": bool(args.quick), "train_recipe": train_recipe.to_dict(),
            "finetune_recipe": ft_recipe.to_dict(), "normalization": norm.to_dict(),
        },
        "rows": rows,
        "widths": widths,
        "notes": notes,
        "seconds": seconds,
        "provenance": report.provenance(seed=args.seed, data="digits", convention=dense_counts.convention,
                                        command=common.command_line(argv)),
    }
    report.write_demo_report(out, record)
    console.table(
        ["criterion", "top-1 pruned", "top-1 fine-tuned", "MACs", "params", "latency", "time"],
        [[r["name"], report.pct(r["top1_before_finetune"]), report.pct(r["top1"]), report.human(r["macs"]),
          report.human(r["params"]), f"{r['latency']['median_ms']:.3f} ms", f"{r['seconds']:.1f} s"] for r in rows],
        title=f"pare demo: small_cnn on digits, -{100 * args.reduce_macs:.0f}% MACs, fine-tune "
              f"{ft_recipe.epochs} epoch(s), test top-1 (final epoch)",
    )
    console.out(f"wrote {out / 'report.md'}, {out / 'metrics.json'}"
                + (f" and {len(record['plots'])} plots" if record["plots"] else f" (plots skipped: "
                   f"{record['plots_skipped']})") + f" in {seconds['total']:.0f} s")
    return record
