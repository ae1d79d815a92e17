"""``pare prune``: load a model and data, prune to a budget, optionally fine-tune, write artifact + report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from torch import nn

from pare.allocate.budget import Budget
from pare.allocate.dispatch import ALLOCATIONS
from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand, fraction, nonneg_int, positive_int
from pare.cli.config_file import BUDGET_DESTS
from pare.config import ENGINES, PipelineConfig, default_criterion
from pare.errors import BudgetError, ConfigError
from pare.pipeline import PipelineResult
from pare.pipeline.stages import LoadedModel, Splits

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
                        help="fraction of measured latency to remove (pare.prune_latency)")
    how = parser.add_argument_group("pruning")
    how.add_argument("--criterion", default="auto", metavar="NAME",
                     help="pruning criterion (see 'pare criteria'); auto: l1, the default pipeline's choice on "
                     "validation (docs/benchmarks.md)")
    how.add_argument("--criterion-option", type=common.key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="criterion constructor option, e.g. residual=first for similarity (repeatable)")
    how.add_argument("--allocation", choices=(*ALLOCATIONS, "auto"), default="auto",
                     help="how the budget is spread over the groups (pare.allocate.dispatch); auto: sensitivity "
                     "with --data, global without")
    how.add_argument("--engine", choices=ENGINES, default="pare",
                     help="who prunes: pare's verified surgery, or Torch-Pruning (optional dependency; MACs "
                     "budgets only), repaired and fine-tuned the same way")
    how.add_argument("--steps", type=positive_int, default=1, metavar="N",
                     help="prune in N equal steps (iterative pruning), repairing after each")
    how.add_argument("--round-to", type=positive_int, default=1, metavar="N", help="keep channel counts multiples of N")
    residual = how.add_mutually_exclusive_group()
    residual.add_argument("--internal-only", action="store_true",
                          help="prune only block-internal channels, no residual sums (the default)")
    residual.add_argument("--grouped", action="store_true",
                          help="also prune the coupled residual channels (groups spanning a residual sum)")
    how.add_argument("--compensate", action="store_true",
                     help="least-squares reconstruction of the consumer layers on the calibration data (default "
                     "with --data)")
    how.add_argument("--recalibrate", type=nonneg_int, metavar="N",
                     help="recalibrate BatchNorm statistics on N calibration batches (default with --data: all)")
    how.add_argument("--no-repair", action="store_true",
                     help="neither recalibrate nor compensate (the default repairs both when --data is given)")
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
    given = [dest for dest in BUDGET_DESTS if getattr(args, dest, None) is not None]
    flags = ", ".join("--" + d.replace("_", "-") for d in BUDGET_DESTS)
    if not given:
        raise BudgetError(f"no budget: give exactly one of {flags}")
    if len(given) > 1:
        raise BudgetError("conflicting budgets " + " and ".join("--" + d.replace("_", "-") for d in given)
                          + ": give exactly one")
    return given[0], getattr(args, given[0])


def make_budget(kind: str, value: float | str) -> Budget | None:
    if kind == "reduce_latency":
        if not 0.0 <= float(value) < 1.0:
            raise BudgetError(f"--reduce-latency {value} is outside [0, 1) (it is the fraction removed)")
        return None
    field = {"reduce_macs": "macs_reduction", "reduce_params": "params_reduction",
             "channel_ratio": "channel_ratio", "sparsity": "sparsity"}[kind]
    return Budget(**{field: value})


def config_from_args(args: argparse.Namespace, budget: Budget | None) -> PipelineConfig:
    """The pipeline configuration the flags describe (what metrics.json records and ``pare run`` replays);
    ``budget`` None = the --reduce-latency target."""
    from pare.config import (
        DataConfig,
        EvalConfig,
        FinetuneConfig,
        LatencyConfig,
        ModelConfig,
        PruneConfig,
        RepairConfig,
    )

    finetune = None
    if args.finetune:
        finetune = FinetuneConfig(recipe=common.build_recipe(args, args.finetune), augment=args.augment or "auto")
    # Default (None): both repairs when there are data. --compensate recalibrates first unless --recalibrate 0;
    # --recalibrate N alone recalibrates on N batches and does not compensate.
    if args.no_repair:
        recalibrate, compensate = False, False
    elif args.compensate or args.recalibrate is not None:
        recalibrate = args.compensate if args.recalibrate is None else args.recalibrate > 0
        compensate = args.compensate
    else:
        recalibrate = compensate = None
    return PipelineConfig(
        model=ModelConfig(name=args.model, weights=args.weights, options=dict(args.model_option),
                          num_classes=args.num_classes, input_size=args.input_size),
        # Without fine-tuning nothing needs a validation share: calibration draws from all training images.
        data=DataConfig(path=args.data, val_fraction=args.val_fraction if args.finetune else 0.0,
                        calib_images=args.calib_images, calib_batch_size=min(args.batch_size, args.calib_images),
                        normalization=args.normalization, mean=args.mean, std=args.std, seed=args.seed),
        criterion=args.criterion,
        criterion_options=dict(args.criterion_option),
        target=budget or Budget(macs_reduction=0.0),
        latency=None if budget is not None else LatencyConfig(args.reduce_latency, max(args.latency_runs, 10),
                                                               args.threads or 1),
        prune=PruneConfig(engine=args.engine, allocation=args.allocation, round_to=args.round_to,
                          internal_only=not args.grouped, verify=not args.no_verify, seed=args.seed,
                          convention=args.convention, steps=args.steps),
        repair=RepairConfig(recalibrate=recalibrate, compensate=compensate,
                            recalibrate_batches=args.recalibrate or None),
        finetune=finetune,
        eval=EvalConfig(splits=("test",) if args.data else (), batch_size=args.batch_size),
    )


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import torch

    from pare.criteria.base import get_criterion
    from pare.io import save
    from pare.pipeline import prepare
    from pare.pipeline import run as run_pipeline

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
    if args.no_repair and (args.compensate or args.recalibrate):
        raise ConfigError("--no-repair cannot be combined with --compensate or --recalibrate")
    criterion = default_criterion(args.data is not None) if args.criterion == "auto" else args.criterion
    crit_obj = get_criterion(criterion, **dict(args.criterion_option))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(common.resolve_device(args.device))
    needs_data = crit_obj.needs_data or args.compensate or bool(args.recalibrate) or args.finetune is not None
    if args.data is None and needs_data:
        what = ("criterion " + crit_obj.name if crit_obj.needs_data else
                "--finetune" if args.finetune else "--compensate/--recalibrate")
        raise ConfigError(f"{what} needs calibration/training data: pass --data PATH")
    if args.finetune is None and any(getattr(args, k) is not None for k in ("epochs", "lr", "train_batch_size")):
        raise ConfigError("--epochs/--lr/--train-batch-size need --finetune RECIPE")
    if args.resume and args.finetune is None:  # nothing to resume: it would only replace the earlier run
        raise ConfigError("--resume continues an interrupted --finetune run; without --finetune use --overwrite")
    config = config_from_args(args, budget)
    out = common.prepare_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)

    t0 = time.perf_counter()
    if args.data is not None:
        console.info(f"loading data {args.data}")
    loaded, data = prepare(config, progress=console.progress, device=device)
    seconds["load"] = time.perf_counter() - t0
    console.info(f"pruning with {crit_obj.name} to {kind.replace('_', '-')}={value}"
                 + (f", fine-tuning with recipe {args.finetune}" if args.finetune else ""))
    result = run_pipeline(config, model=loaded, data=data, device=device, out_dir=out, resume=args.resume,
                          progress=console.progress)
    seconds.update(result.seconds)
    record = _record(args, argv, result, loaded, data)
    reduction = record["reduction"]
    console.info(f"removed {record['removed_channels']} channels: MACs -{100 * reduction['macs_reduction']:.1f}%, "
                 f"params -{100 * reduction['params_reduction']:.1f}%")
    record["latency"] = _latency(args, console, result.dense, result.model, result.input_shape, seconds)
    t0 = time.perf_counter()
    metadata = {
        "criterion": record["criterion"], "budget": record["budget"], "input_shape": record["input_shape"],
        "normalization": data.normalization.to_dict(),
        "dense_model": getattr(result.dense, "pare_zoo", None) or loaded.provenance.get("dense_model"),
        "source": loaded.path, "source_sha256": loaded.sha256, "counts_before": record["counts_before"],
        "counts_after": record["counts_after"], "seed": args.seed, "config": config.to_dict(),
    }
    artifact = save(result.model, out / ARTIFACT_NAME, metadata=metadata)
    seconds["save"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    record["seconds"] = seconds
    return _write(console, out, record, artifact)


def _record(args: argparse.Namespace, argv: list[str], result: PipelineResult, loaded: LoadedModel,
            data: Splits) -> dict[str, Any]:
    """metrics.json of a ``pare prune`` run: the pipeline's record (with its configuration) plus the CLI's."""
    from pare import report

    last = result.prune[-1]
    record: dict[str, Any] = result.record()
    record.update({
        "kind": "prune",
        "command": common.command_line(argv),
        "model": {"name": args.model, "source": loaded.source, "path": loaded.path, "sha256": loaded.sha256,
                  "zoo": getattr(loaded.model, "pare_zoo", None)},
        "artifact": ARTIFACT_NAME,
        "data": {"path": args.data, "test_images": len(data.tests["test"]) if "test" in data.tests else None,
                 "train_images": None if data.train is None else len(data.train) + len(data.val or []),
                 "calib_images": args.calib_images if data.calib is not None else None,
                 "normalization": data.normalization.to_dict()},
        "criterion_options": dict(args.criterion_option),
        "groups_pruned": len(last.removals),
        "prune_seconds": last.seconds,
        "groups": last.groups,
        "layers": report.layer_rows(last.counts_after, last.counts_before),
        # Stage -> test-split metrics (fractions), as report.md shows them.
        "accuracy": {stage: splits["test"] for stage, splits in result.accuracy.items() if "test" in splits},
        "latency_note": None if last.latency is None else "The latency search's own before/after "
                        "measurements are in metrics.json (latency_search).",
        "provenance": report.provenance(seed=args.seed, data=args.data, convention=args.convention,
                                        command=common.command_line(argv)),
    })
    return record
def _print_summary(console: Console, record: dict[str, Any], out: Path) -> None:
    from pare.report import human, pct

    before, after, red = record["counts_before"], record["counts_after"], record["reduction"]
    acc = record["accuracy"]
    rows = [["MACs", human(before["macs"]), human(after["macs"]), f"{100 * red['macs_reduction']:.2f}%"],
            ["params", human(before["params"]), human(after["params"]), f"{100 * red['params_reduction']:.2f}%"]]
    if "dense" in acc:
        final = acc.get("finetuned", acc.get("pruned", {}))
        rows.append(["top-1", pct(acc["dense"]["top1"]), pct(final.get("top1")),
                     "fine-tuned" if "finetuned" in acc else "no fine-tune"])
    if record["latency"]:
        lat = record["latency"]
        rows.append(["latency", f"{lat['dense']['median_ms']:.3f} ms", f"{lat['pruned']['median_ms']:.3f} ms",
                     f"{lat['dense']['median_ms'] / lat['pruned']['median_ms']:.2f}x"])
    console.table(["", "before", "after", "change"], rows,
                  title=f"{record['criterion']} {record['budget']} ({record['removed_channels']} channels removed):")
    console.out(f"wrote {out / ARTIFACT_NAME}, {out / 'report.md'}, {out / 'metrics.json'}")


def _latency(args: argparse.Namespace, console: Console, dense: nn.Module, pruned: nn.Module,
             example_shape: list[int], seconds: dict[str, float]) -> dict[str, Any]:
    """Batch-1 eager latency of the dense and the pruned model, interleaved (``--latency-runs 0``: none)."""
    if not args.latency_runs:
        return {}
    import torch

    from pare.latency import compare_latency

    t0 = time.perf_counter()
    console.info("measuring latency (batch 1, eager)")
    example = torch.randn((1, *example_shape), generator=torch.Generator().manual_seed(0))
    measured = compare_latency({"dense": dense.cpu().eval(), "pruned": pruned.eval()}, example,
                               runs=args.latency_runs, warmup=5, rounds=min(5, args.latency_runs),
                               threads=args.threads or 1)
    seconds["latency"] = time.perf_counter() - t0
    return {name: lat.to_dict() for name, lat in measured.items()}


def _write(console: Console, out: Path, record: dict[str, Any], artifact: Path) -> dict[str, Any]:
    from pare import report

    paths = report.write_prune_report(out, record)
    _print_summary(console, record, out)
    record["files"] = {name: str(path) for name, path in paths.items()} | {"artifact": str(artifact)}
    return record
