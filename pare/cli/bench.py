"""``pare bench``: measured latency (median and IQR) of one or more models, eager and/or ONNX Runtime."""

from __future__ import annotations

import argparse
from typing import Any

from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand
from pare.errors import ConfigError

NAME = "bench"
EPILOG = """\
examples:
  pare bench runs/r56-chip/model.safetensors resnet56 --input-size 3x32x32
  pare bench resnet56 --input-size 3x32x32 --batch-sizes 1,16 --threads 1 --backend both --runs 100

Several models are measured in interleaved rounds (pare.latency.compare_latency) so that machine-load drift hits
them alike; the speed-up column is relative to the first model. Times are milliseconds per batch; each figure is
the median over the rounds' medians, with the IQR across rounds. Timing depends on the machine and its load:
compare figures from one run only.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="measure latency (median, IQR)",
                            description="Time the forward pass of one or more models (artifacts or zoo names).",
                            epilog=EPILOG)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="pare artifact files or zoo model names")
    common.add_model_options(parser, weights=False)
    parser.add_argument("--batch-sizes", type=common.int_list, default=[1], metavar="B1,B2",
                        help="comma-separated batch sizes")
    parser.add_argument("--threads", type=common.positive_int, default=1, metavar="N", help="intra-op threads")
    parser.add_argument("--backend", choices=("eager", "onnxruntime", "both"), default="eager",
                        help="PyTorch eager, ONNX Runtime (onnx extra) or both")
    parser.add_argument("--runs", type=common.positive_int, default=50, metavar="N", help="timed runs per model")
    parser.add_argument("--warmup", type=common.nonneg_int, default=10, metavar="N", help="untimed warm-up runs")
    parser.add_argument("--rounds", type=common.positive_int, default=5, metavar="N",
                        help="interleaved rounds (the runs are split over them)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (eager only)")
    return parser


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    from pare.latency import compare_latency

    device = common.resolve_device(args.device)
    if args.rounds > args.runs:
        raise ConfigError(f"--rounds {args.rounds} is more than --runs {args.runs}")
    backends = ["eager", "onnxruntime"] if args.backend == "both" else [args.backend]
    if device.type == "cuda" and "onnxruntime" in backends:
        raise ConfigError("--backend onnxruntime runs on CPU here; use --device cpu or --backend eager")
    loaded = [common.load_model(m, num_classes=args.num_classes, options=args.model_option) for m in args.models]
    labels = [item.label for item in loaded]
    if len(set(labels)) != len(labels):
        raise ConfigError("the same model is given twice")
    shape = common.pick_input_shape(args.input_size, loaded[0])
    for item in loaded[1:]:
        if args.input_size is None and item.recorded_input_shape not in (None, shape):
            raise ConfigError(f"{item.label} records input {item.recorded_input_shape}, {labels[0]} {shape}; "
                              "pass --input-size")
    models = {item.label: item.model.to(device).eval() for item in loaded}
    results = []
    configs = [(b, backend) for backend in backends for b in args.batch_sizes]
    for batch, backend in console.bar(configs, desc="benchmark"):
        measured = compare_latency(models, common.example_inputs(shape, batch, device), rounds=args.rounds,
                                   runs=args.runs, warmup=args.warmup, threads=args.threads, backend=backend,
                                   device=device)
        first = measured[labels[0]].median_ms
        for label in labels:
            lat = measured[label]
            results.append({"model": label, **lat.to_dict(), "speedup_vs_first": first / lat.median_ms})
    console.table(["model", "backend", "batch", "threads", "median", "IQR", "speed-up"],
                  [[r["model"], r["backend"], r["batch_size"], r["threads"], f"{r['median_ms']:.3f} ms",
                    f"{r['iqr_ms']:.3f} ms", f"{r['speedup_vs_first']:.2f}x"] for r in results])
    return {"input_shape": list(shape), "results": results}
