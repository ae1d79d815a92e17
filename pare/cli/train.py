"""``pare train``: fine-tune (or train) an artifact or a zoo model on a data set with a recipe preset."""

from __future__ import annotations

import argparse
import time
from typing import Any

from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand
from pare.data import InMemoryLoader
from pare.errors import ConfigError

NAME = "train"
ARTIFACT_NAME = "model.safetensors"
EPILOG = """\
examples:
  # fine-tune a pruned artifact for 40 epochs with the Li et al. recipe
  pare train runs/r56-chip/model.safetensors --data cifar-10-batches-py --recipe li2017 --out runs/r56-chip-ft

  # train the demo CNN from scratch on digits for 5 epochs with a higher learning rate
  pare train small_cnn --data digits --recipe cifar-standard --epochs 5 --lr 0.05 --out runs/digits

Model selection uses a seeded held-out split of the training data (--val-fraction); the test accuracy reported
is that of the final-epoch weights. Outputs in --out: model.safetensors, metrics.json, and the resumable
checkpoint plus per-epoch metrics.jsonl in finetune/ (continue an interrupted run with --resume).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="fine-tune an artifact or zoo model with a recipe",
                            description="Train an artifact or a zoo model (optionally from --weights) on --data "
                            "with a recipe preset, and save the result as a pare artifact.", epilog=EPILOG)
    parser.add_argument("model", metavar="MODEL", help="pare artifact file or zoo model name")
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of options (command line wins)")
    common.add_model_options(parser)
    common.add_data_options(parser)
    common.add_training_options(parser, recipe_flag="--recipe")
    parser.add_argument("--out", metavar="DIR", help="output folder (required)")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of training")
    parser.add_argument("--threads", type=common.positive_int, metavar="N", help="torch intra-op threads")
    return parser


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import torch

    from pare import report
    from pare.config import DataConfig
    from pare.evaluate import evaluate
    from pare.io import save
    from pare.pipeline.stages import is_artifact, load_data, train_loaders
    from pare.train import fit

    if args.recipe is None:
        raise ConfigError("--recipe RECIPE is required (e.g. li2017, chip, cifar-standard)")
    if args.data is None:
        raise ConfigError("--data PATH is required")
    if not args.out:
        raise ConfigError("--out DIR is required")
    common.check_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    recipe = common.build_recipe(args, args.recipe)
    out = common.prepare_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    # An artifact records its normalization (needed to read the data); a zoo model takes the data's class count.
    artifact = common.load_model(args.model, weights=args.weights) if is_artifact(args.model) else None
    norm = common.normalization(args, args.model, artifact)
    data = load_data(DataConfig(path=args.data, val_fraction=args.val_fraction, seed=args.seed), norm,
                     need_train=True, calibrate=False, splits=("test",))
    loaded = artifact or common.load_model(args.model, weights=args.weights,
                                           num_classes=args.num_classes or data.classes,
                                           options=args.model_option, seed=args.seed)
    shape = args.input_size or data.input_size
    test_loader = InMemoryLoader(data.tests["test"], max(recipe.batch_size, 256), shuffle=False, normalization=norm)
    t0 = time.perf_counter()
    before = dict(evaluate(loaded.model, test_loader, device=device))
    console.info(f"training {recipe.epochs} epoch(s) with recipe {recipe.name} (test top-1 before: "
                 f"{report.pct(before['top1'])})")
    result = fit(loaded.model, *train_loaders(recipe, data, args.augment or "auto"), recipe,
                 test_loader=test_loader, out_dir=out / "finetune", resume=args.resume, device=device,
                 progress=console.progress)
    record = {
        "recipe": recipe.to_dict(), "epochs_completed": result.epochs_completed, "train_images": len(data.train or []),
        "val_images": len(data.val or []), "final_val_top1": result.final_val_acc, "best_val_top1": result.best_val_acc,
        "best_val_epoch": result.best_val_epoch, "test_top1_final_epoch": result.test_acc,
        "test_loss": result.test_loss,
        "resumed_from": list(result.resumed_from) if result.resumed_from else None, "seconds": result.seconds,
    }
    model = loaded.model.to("cpu")
    metadata = {"input_shape": list(shape), "normalization": norm.to_dict(), "source": loaded.path,
                "source_sha256": loaded.sha256, "trained_with": recipe.to_dict(), "seed": args.seed,
                "dense_model": loaded.provenance.get("dense_model") or getattr(model, "pare_zoo", None)}
    for key in ("criterion", "budget", "counts_before"):
        if key in loaded.provenance:
            metadata[key] = loaded.provenance[key]
    artifact = save(model, out / ARTIFACT_NAME, metadata=metadata)
    outcome = {
        "kind": "train",
        "command": common.command_line(argv),
        "model": loaded.to_dict(),
        "data": args.data,
        "test_before": before,
        "train": record,
        "seconds": time.perf_counter() - t0,
        "artifact": str(artifact),
        "provenance": report.provenance(seed=args.seed, data=args.data, convention="macs",
                                        command=common.command_line(argv)),
    }
    report.write_json(out / report.METRICS_NAME, outcome)
    console.table(["", "test top-1"], [["before", report.pct(before["top1"])],
                                       ["after (final epoch)", report.pct(record["test_top1_final_epoch"])]])
    console.out(f"wrote {artifact} and {out / report.METRICS_NAME}")
    return outcome
