"""``pare export``: ONNX export of an artifact or a zoo model (pare.export_onnx)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand
from pare.errors import ConfigError

NAME = "export"
EPILOG = """\
examples:
  pare export runs/r56-chip/model.safetensors --output r56-chip.onnx
  pare export resnet20 --weights resnet20.th --input-size 3x32x32 --output r20.onnx --static-batch

The batch dimension is dynamic unless --static-batch. An existing --output is refused without --overwrite.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="export a model to ONNX",
                            description="Export an artifact or a zoo model to one ONNX file (needs the onnx extra).",
                            epilog=EPILOG)
    parser.add_argument("model", metavar="MODEL", help="pare artifact file or zoo model name")
    common.add_model_options(parser)
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="destination .onnx file")
    parser.add_argument("--opset", type=common.positive_int, default=17, help="ONNX opset")
    parser.add_argument("--exporter", choices=("auto", "torchscript", "dynamo"), default="auto",
                        help="torch exporter (auto: TorchScript, then dynamo on failure)")
    parser.add_argument("--static-batch", action="store_true", help="fixed batch dimension of 1")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import pare

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output {output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise ConfigError(f"--output {output}: folder {output.parent} does not exist")
    loaded = common.load_model(args.model, weights=args.weights, num_classes=args.num_classes,
                               options=args.model_option)
    shape = common.pick_input_shape(args.input_size, loaded)
    path = pare.export_onnx(loaded.model, common.example_inputs(shape), output, opset=args.opset,
                            exporter=args.exporter, dynamic_batch=not args.static_batch)
    size = path.stat().st_size
    console.out(f"wrote {path} ({size / 1e6:.2f} MB, input 1x{'x'.join(map(str, shape))}, "
                f"{'static' if args.static_batch else 'dynamic'} batch)")
    return {"model": loaded.to_dict(), "output": str(path), "bytes": size, "input_shape": list(shape),
            "opset": args.opset, "dynamic_batch": not args.static_batch}
