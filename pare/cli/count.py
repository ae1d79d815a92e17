"""``pare count``: per-layer widths, MACs and parameters of a model, or of two models side by side."""

from __future__ import annotations

import argparse
from typing import Any

from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand
from pare.errors import ConfigError

NAME = "count"
EPILOG = """\
examples:
  pare count resnet56 --input-size 3x32x32
  pare count runs/r56-chip/model.safetensors          # before/after: the artifact records its dense model
  pare count runs/r56-chip/model.safetensors --before resnet56 --convention chip
  pare count small_cnn --input-size 1x8x8 --json

MACs are per image. Conventions: 'macs' = conv + linear multiply-accumulates (the papers' "FLOPs"); 'chip' = the
CHIP/HRankPlus thop convention (adds conv-bias additions and 2 ops per BatchNorm element). Never compare figures
counted under different conventions.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="per-layer widths, MACs and params",
                            description="Count MACs and parameters per layer. With an artifact that records its "
                            "dense model, or with --before, show before and after.", epilog=EPILOG)
    parser.add_argument("model", metavar="MODEL", help="pare artifact file or zoo model name")
    common.add_model_options(parser, weights=False)
    parser.add_argument("--before", metavar="MODEL",
                        help="the model to compare against (artifact or zoo name); default: the artifact's "
                        "recorded dense model, if any")
    parser.add_argument("--no-before", action="store_true", help="count only MODEL")
    parser.add_argument("--convention", choices=("macs", "chip"), default="macs", help="MACs counting convention")
    return parser


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import pare
    from pare import report
    from pare.models import create

    loaded = common.load_model(args.model, num_classes=args.num_classes, options=args.model_option)
    shape = common.pick_input_shape(args.input_size, loaded)
    example = common.example_inputs(shape)
    after = pare.count(loaded.model, example, args.convention)
    before = None
    before_label = None
    if args.before and args.no_before:
        raise ConfigError("--before and --no-before contradict each other")
    if args.before:
        before_model = common.load_model(args.before, num_classes=args.num_classes, options=args.model_option)
        before, before_label = pare.count(before_model.model, example, args.convention), before_model.label
    elif not args.no_before and isinstance(loaded.provenance.get("dense_model"), dict):
        zoo = loaded.provenance["dense_model"]
        before = pare.count(create(zoo["name"], **zoo.get("kwargs", {})), example, args.convention)
        before_label = f"{zoo['name']} (recorded dense model)"
    rows = report.layer_rows(after, before)
    shown = [r for r in rows if r["kind"] != "bn"]
    if before is None:
        console.table(["layer", "type", "in", "out", "MACs", "params"],
                      [[r["path"], r["type"], r["in_channels"], r["out_channels"], f"{r['macs']:,}",
                        f"{r['params']:,}"] for r in shown])
        console.out(f"total: {after.macs:,} MACs ({args.convention}), {after.params:,} params per image at "
                    f"{'x'.join(map(str, shape))}")
    else:
        def arrow(a: Any, b: Any) -> str:
            return str(b) if a == b else f"{a}->{b}"

        console.table(["layer", "type", "in", "out", "MACs before", "MACs after", "params before", "params after"],
                      [[r["path"], r["type"], arrow(r["in_channels_before"], r["in_channels"]),
                        arrow(r["out_channels_before"], r["out_channels"]),
                        "-" if r["macs_before"] is None else f"{r['macs_before']:,}", f"{r['macs']:,}",
                        "-" if r["params_before"] is None else f"{r['params_before']:,}", f"{r['params']:,}"]
                       for r in shown])
        red = after.reduction_vs(before)
        console.out(f"before ({before_label}): {before.macs:,} MACs, {before.params:,} params; after: "
                    f"{after.macs:,} MACs (-{100 * red['macs_reduction']:.2f}%), {after.params:,} params "
                    f"(-{100 * red['params_reduction']:.2f}%); convention {args.convention}")
    return {
        "model": loaded.to_dict(),
        "input_shape": list(shape),
        "counts": after.to_dict(),
        "before": None if before is None else {"model": before_label, "counts": before.to_dict(),
                                               "reduction": after.reduction_vs(before)},
        "layers": rows,
    }
