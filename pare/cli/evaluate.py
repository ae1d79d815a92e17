"""``pare eval``: top-1/top-5 accuracy and loss of an artifact or a zoo model (+ weights) on a data set."""

from __future__ import annotations

import argparse
import time
from typing import Any

from pare.checks import report_eval_inputs
from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand

NAME = "eval"
EPILOG = """\
examples:
  pare eval runs/r56-chip/model.safetensors --data cifar-10-batches-py
  pare eval resnet56 --weights resnet56-4bfd9763.th --data cifar-10-batches-py --normalization imagenet
  pare eval small_cnn --data digits --split train --json

Artifacts written by 'pare prune' record their normalisation, which is used unless --normalization is given.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="accuracy of a model on a data set",
                            description="Evaluate an artifact or a zoo model (with --weights) on a data split: "
                            "top-1, top-5 and mean cross-entropy.", epilog=EPILOG)
    parser.add_argument("model", metavar="MODEL", help="pare artifact file or zoo model name")
    common.add_model_options(parser)
    common.add_data_options(parser, required=True)
    parser.add_argument("--split", choices=("test", "train"), default="test", help="which split to evaluate")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=common.positive_int, metavar="N", help="torch intra-op threads")
    return parser


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import torch

    from pare.data import InMemoryLoader
    from pare.evaluate import evaluate
    from pare.pipeline.stages import read_split
    from pare.report import pct

    common.check_paths(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    dataset = read_split(args.data, args.split)
    loaded = common.load_model(args.model, weights=args.weights,
                               num_classes=args.num_classes or len(dataset.classes), options=args.model_option)
    shape = tuple(int(v) for v in dataset.images.shape[1:])
    report_eval_inputs(loaded.model, args.input_size, shape)  # size mismatch: error; NaN weights: a warning
    norm = common.normalization(args, args.model, loaded)
    t0 = time.perf_counter()
    loader = InMemoryLoader(dataset, args.batch_size, shuffle=False, normalization=norm)
    metrics = dict(evaluate(loaded.model, loader, device=device))
    seconds = time.perf_counter() - t0
    console.table(["model", "split", "images", "top-1", "top-5", "loss"],
                  [[loaded.label, args.split, metrics["n"], pct(metrics["top1"]), pct(metrics["top5"]),
                    f"{metrics['loss']:.4f}"]])
    return {"model": loaded.to_dict(), "data": args.data, "split": args.split, "normalization": norm.to_dict(),
            "metrics": metrics, "seconds": seconds}
