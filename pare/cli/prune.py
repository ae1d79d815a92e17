"""``pare prune``: load a model and data, prune to a budget, optionally fine-tune, write artifact + report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand, fraction, nonneg_int, positive_int
from pare.errors import BudgetError, ConfigError

NAME = "prune"
ARTIFACT_NAME = "model.safetensors"
EPILOG = """\
examples:
  # akamaster ResNet-56 on CIFAR-10, CHIP, half the MACs, no fine-tuning
  pare prune --model resnet56 --weights resnet56-4bfd9763.th --data cifar-10-batches-py \\
      --normalization imagenet --criterion chip --reduce-macs 0.5 --out runs/r56-chip

  # the same, then 30 epochs of the CHIP fine-tuning recipe on a seeded 90/10 train/val split
  pare prune --model resnet56 --weights resnet56-4bfd9763.th --data cifar-10-batches-py \\
      --normalization imagenet --criterion chip --reduce-macs 0.5 --finetune chip --epochs 30 --out runs/r56-ft

  # a HRank/CHIP sparsity string, least-squares compensation, BN recalibration on 8 batches
  pare prune --model resnet56 --weights resnet56.th --data cifar10_jpeg --normalization imagenet \\
      --sparsity '[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9' --criterion l1 --compensate --recalibrate 8 --out runs/s

  # options from a file (JSON or YAML, keys = long option names); command-line flags win
  pare prune --config prune.yaml --reduce-macs 0.6 --out runs/r56-60

budgets (exactly one): --reduce-macs F, --reduce-params F, --channel-ratio F (fractions REMOVED, in [0, 1)),
--sparsity STRING, --reduce-latency F (measured latency).
outputs in --out: model.safetensors (pare artifact), report.md, metrics.json, layer_widths.png, and with
--finetune the fine-tuning checkpoint and metrics.jsonl in finetune/.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="prune a model to a budget (and fine-tune)",
                            description="Prune a zoo model (with a checkpoint) or a pare artifact to a budget with "
                            "a criterion, verify the surgery, optionally fine-tune, and write the artifact, "
                            "report.md, metrics.json and plots into --out.", epilog=EPILOG)
    parser.add_argument("--config", metavar="FILE", help="JSON or YAML file of options (command line wins)")
    parser.add_argument("--model", metavar="NAME|ARTIFACT", help="zoo model name (see pare.models) or a pare artifact")
    common.add_model_options(parser)
    common.add_data_options(parser)
    budget = parser.add_argument_group("budget (exactly one)")
    budget.add_argument("--reduce-macs", type=fraction, metavar="F", help="fraction of MACs to remove")
    budget.add_argument("--reduce-params", type=fraction, metavar="F", help="fraction of parameters to remove")
    budget.add_argument("--channel-ratio", type=fraction, metavar="F", help="fraction of channels to remove")
    budget.add_argument("--sparsity", metavar="STRING", help="HRank/CHIP per-layer sparsity string (zoo models)")
    budget.add_argument("--reduce-latency", type=fraction, metavar="F",
                        help="fraction of measured latency to remove (pare.allocate.latency)")
    how = parser.add_argument_group("pruning")
    how.add_argument("--criterion", default="l1", metavar="NAME", help="pruning criterion (see 'pare criteria')")
    how.add_argument("--criterion-option", type=common.key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="criterion constructor option, e.g. residual=first for similarity (repeatable)")
    how.add_argument("--allocation", choices=("global", "uniform"), default="global",
                     help="rank channels globally or remove the same fraction per group")
    how.add_argument("--round-to", type=positive_int, default=1, metavar="N", help="keep channel counts multiples of N")
    how.add_argument("--internal-only", action="store_true",
                     help="prune only block-internal channels (no residual sums)")
    how.add_argument("--compensate", action="store_true",
                     help="least-squares reconstruction of the consumer layers on the calibration data")
    how.add_argument("--recalibrate", type=nonneg_int, metavar="N",
                     help="recalibrate BatchNorm statistics on N calibration batches (default: only with --compensate)")
    how.add_argument("--calib-images", type=positive_int, default=512, metavar="N",
                     help="calibration images drawn (seeded) from the training split")
    how.add_argument("--convention", choices=("macs", "chip"), default="macs", help="MACs counting convention")
    how.add_argument("--no-verify", action="store_true", help="skip the equivalence check of the surgery")
    common.add_training_options(parser, recipe_flag="--finetune")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", metavar="DIR", help="output folder (required)")
    run_group.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    run_group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run_group.add_argument("--seed", type=int, default=0, help="seed of splits, calibration, criteria and training")
    run_group.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads")
    run_group.add_argument("--latency-runs", type=nonneg_int, default=30, metavar="N",
                           help="timed runs per model for the latency figures (0: skip latency)")
    return parser


def budget_from_args(args: argparse.Namespace) -> tuple[str, float | str]:
    """(budget flag dest, value) of the one budget given; BudgetError for none or several."""
    given = [dest for dest in common.BUDGET_DESTS if getattr(args, dest, None) is not None]
    flags = ", ".join("--" + d.replace("_", "-") for d in common.BUDGET_DESTS)
    if not given:
        raise BudgetError(f"no budget: give exactly one of {flags}")
    if len(given) > 1:
        raise BudgetError("conflicting budgets " + " and ".join("--" + d.replace("_", "-") for d in given)
                          + ": give exactly one")
    return given[0], getattr(args, given[0])


def make_budget(kind: str, value: float | str) -> Any:
    from pare.allocate import Budget

    if kind == "reduce_latency":
        if not 0.0 <= float(value) < 1.0:
            raise BudgetError(f"--reduce-latency {value} is outside [0, 1) (it is the fraction removed)")
        return None
    field = {"reduce_macs": "macs_reduction", "reduce_params": "params_reduction",
             "channel_ratio": "channel_ratio", "sparsity": "sparsity"}[kind]
    return Budget(**{field: value})


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import torch

    import pare
    from pare.criteria.base import get_criterion

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    if not args.model:
        raise ConfigError("--model is required (a zoo model name or a pare artifact), on the command line or in "
                          "--config")
    if not args.out:
        raise ConfigError("--out DIR is required (where the artifact and the report go)")
    common.check_paths(args)
    kind, value = budget_from_args(args)
    budget = make_budget(kind, value)
    crit_obj = get_criterion(args.criterion, **dict(args.criterion_option))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    needs_data = crit_obj.needs_data or args.compensate or bool(args.recalibrate) or args.finetune is not None
    if args.data is None and needs_data:
        what = ("criterion " + crit_obj.name if crit_obj.needs_data else
                "--finetune" if args.finetune else "--compensate/--recalibrate")
        raise ConfigError(f"{what} needs calibration/training data: pass --data PATH")
    if args.finetune is None and any(getattr(args, k) is not None for k in ("epochs", "lr", "train_batch_size")):
        raise ConfigError("--epochs/--lr/--train-batch-size need --finetune RECIPE")
    if args.resume and args.finetune is None:  # nothing to resume: it would only replace the earlier run
        raise ConfigError("--resume continues an interrupted --finetune run; without --finetune use --overwrite")
    recipe = common.build_recipe(args, args.finetune) if args.finetune else None
    out = common.prepare_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    common.seed_everything(args.seed)

    # ---------------------------------------------------------------------------------------- load
    t0 = time.perf_counter()
    train = test = val = fit_train = None
    if args.data is not None:
        console.info(f"loading data {args.data}")
        train = common.load_split(args.data, "train") if needs_data else None
        test = common.load_split(args.data, "test")
    num_classes = args.num_classes or (len(test.classes) if test is not None else None)
    loaded = common.load_model(args.model, weights=args.weights, num_classes=num_classes,
                               options=args.model_option)
    model = loaded.model
    shape = common.pick_input_shape(args.input_size, loaded, test)
    example = common.example_inputs(shape)
    norm = common.resolve_normalization(args, shape[0], loaded.provenance.get("normalization"))
    calib = None
    if train is not None:
        fit_train, val = common.split_train(train, args.val_fraction, args.seed) if recipe else (train, None)
        calib = common.calibration(fit_train, args.calib_images, min(args.batch_size, args.calib_images), norm,
                                   args.seed)
    seconds["load"] = time.perf_counter() - t0

    accuracy: dict[str, dict[str, Any]] = {}
    if test is not None:
        t0 = time.perf_counter()
        console.info(f"evaluating the dense model on {len(test)} test images")
        accuracy["dense"] = common.evaluate_top1(model, test, norm, args.batch_size, device)
        model.to("cpu")
        seconds["evaluate_dense"] = time.perf_counter() - t0

    # --------------------------------------------------------------------------------------- prune
    console.info(f"pruning with {crit_obj.name} to {kind.replace('_', '-')}={value}")
    t0 = time.perf_counter()
    prune_kwargs: dict[str, Any] = {
        "allocation": args.allocation, "round_to": args.round_to, "internal_only": args.internal_only,
        "verify": not args.no_verify, "compensate": args.compensate, "seed": args.seed,
        "convention": args.convention,
        "recalibrate": args.recalibrate if args.recalibrate is not None else (None if args.compensate else False),
    }
    recorded_latency = None
    if kind == "reduce_latency":
        try:
            from pare.allocate.latency import prune_to_latency
        except ImportError as exc:
            raise ConfigError(f"--reduce-latency needs pare.allocate.latency, which this pare lacks ({exc})") from None
        console.info("searching the MACs budget that meets the latency target (timing every candidate)")
        result = prune_to_latency(model, example, reduction=float(value), criterion=crit_obj, data=calib,
                                  threads=args.threads or 1, runs=max(args.latency_runs, 10), **prune_kwargs)
        recorded_latency = getattr(result, "latency", None)
    else:
        result = pare.prune(model, example, criterion=crit_obj, target=budget, data=calib, **prune_kwargs)
    pruned = result.model
    seconds["prune"] = time.perf_counter() - t0
    summary = result.summary()
    reduction = result.reduction
    console.info(f"removed {summary['removed_channels']} channels: MACs -{100 * reduction['macs_reduction']:.1f}%, "
                 f"params -{100 * reduction['params_reduction']:.1f}%")

    if test is not None:
        t0 = time.perf_counter()
        accuracy["pruned"] = common.evaluate_top1(pruned, test, norm, args.batch_size, device)
        pruned.to("cpu")
        seconds["evaluate_pruned"] = time.perf_counter() - t0

    finetune_record = None
    if recipe is not None:
        console.info(f"fine-tuning {recipe.epochs} epoch(s) with recipe {recipe.name}")
        t0 = time.perf_counter()
        augment = common.default_augment(train) if args.augment is None else (None if args.augment == "none"
                                                                               else args.augment)
        finetune_record = common.finetune(
            pruned, recipe, train=fit_train, val=val, test=test, norm=norm, augment=augment, seed=args.seed,
            device=device, out_dir=out / "finetune", resume=args.resume, console=console)
        pruned.to("cpu")
        seconds["finetune"] = time.perf_counter() - t0
        accuracy["finetuned"] = {"top1": finetune_record["test_top1_final_epoch"], "top5": None, "n": len(test),
                                 "loss": finetune_record["test_loss"]}

    # ------------------------------------------------------------------------------------- latency
    latency: dict[str, Any] = {}
    if args.latency_runs:
        from pare.latency import compare_latency

        t0 = time.perf_counter()
        console.info("measuring latency (batch 1, eager)")
        measured = compare_latency({"dense": model.cpu().eval(), "pruned": pruned.eval()}, example,
                                   runs=args.latency_runs, warmup=5, rounds=min(5, args.latency_runs),
                                   threads=args.threads or 1)
        latency = {name: lat.to_dict() for name, lat in measured.items()}
        seconds["latency"] = time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------- save
    t0 = time.perf_counter()
    metadata = {
        "criterion": result.criterion,
        "budget": f"{kind}={value}",
        "input_shape": list(shape),
        "normalization": norm.to_dict(),
        "dense_model": getattr(model, "pare_zoo", None) or loaded.provenance.get("dense_model"),
        "source": loaded.path,
        "source_sha256": loaded.sha256,
        "counts_before": result.counts_before.to_dict(),
        "counts_after": result.counts_after.to_dict(),
        "seed": args.seed,
    }
    artifact = pare.save(pruned, out / ARTIFACT_NAME, metadata=metadata)
    seconds["save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    from pare import report

    record: dict[str, Any] = {
        "kind": "prune",
        "command": common.command_line(argv),
        "model": loaded.to_dict(),
        "artifact": artifact.name,
        "data": {"path": args.data, "test_images": len(test) if test is not None else None,
                 "train_images": len(train) if train is not None else None,
                 "calib_images": args.calib_images if calib is not None else None,
                 "normalization": norm.to_dict()},
        "input_shape": list(shape),
        "criterion": result.criterion,
        "criterion_options": dict(args.criterion_option),
        "budget": f"{kind}={value}",
        "allocation": result.allocation,
        "residual_mode": result.residual_mode,
        "removed_channels": summary["removed_channels"],
        "groups_pruned": summary["groups_pruned"],
        "notes": summary["notes"],
        "counts_before": summary["counts_before"],
        "counts_after": summary["counts_after"],
        "reduction": reduction,
        "prune_seconds": result.seconds,
        "groups": result.groups,
        "layers": report.layer_rows(result.counts_after, result.counts_before),
        "accuracy": accuracy,
        "finetune": finetune_record,
        "latency": latency,
        "latency_note": None,
        "seconds": seconds,
        "provenance": report.provenance(seed=args.seed, data=args.data, convention=args.convention,
                                        command=common.command_line(argv)),
    }
    if recorded_latency is not None:
        record["latency_search"] = recorded_latency
        record["latency_note"] = "The latency search's own before/after measurements are in metrics.json " \
                                 "(latency_search)."
    paths = report.write_prune_report(out, record)
    _print_summary(console, record, out)
    record["files"] = {name: str(path) for name, path in paths.items()} | {"artifact": str(artifact)}
    return record


def _print_summary(console: Console, record: dict[str, Any], out: Path) -> None:
    from pare.report import human

    before, after, red = record["counts_before"], record["counts_after"], record["reduction"]
    acc = record["accuracy"]
    rows = [["MACs", human(before["macs"]), human(after["macs"]), f"{100 * red['macs_reduction']:.2f}%"],
            ["params", human(before["params"]), human(after["params"]), f"{100 * red['params_reduction']:.2f}%"]]
    if "dense" in acc:
        final = acc.get("finetuned", acc.get("pruned", {}))
        rows.append(["top-1", f"{acc['dense']['top1']:.2f}%", f"{final.get('top1'):.2f}%",
                     "fine-tuned" if "finetuned" in acc else "no fine-tune"])
    if record["latency"]:
        lat = record["latency"]
        rows.append(["latency", f"{lat['dense']['median_ms']:.3f} ms", f"{lat['pruned']['median_ms']:.3f} ms",
                     f"{lat['dense']['median_ms'] / lat['pruned']['median_ms']:.2f}x"])
    console.table(["", "before", "after", "change"], rows,
                  title=f"{record['criterion']} {record['budget']} ({record['removed_channels']} channels removed):")
    console.out(f"wrote {out / ARTIFACT_NAME}, {out / 'report.md'}, {out / 'metrics.json'}")

