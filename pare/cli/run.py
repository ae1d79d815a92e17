"""``pare run --config FILE``: replay a recorded pipeline configuration (a benchmark row, a demo row, a
``pare prune`` metrics.json) through :func:`pare.pipeline.run` and print its figures."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pare.cli import _common as common
from pare.cli._common import Console, add_subcommand, positive_int
from pare.cli.config_file import read_config
from pare.config import PipelineConfig
from pare.errors import ConfigError

NAME = "run"
EPILOG = """\
examples:
  pare run --config row.json                         # a configuration (pare.config.PipelineConfig as JSON)
  pare run --config pare-demo/metrics.json --row l1  # one row of a record that holds several
  pare run --config prune.yaml --out runs/replay     # YAML too; --out keeps metrics.json and the model

FILE is a configuration mapping, a record with a "config" key (pare prune's metrics.json, a benchmark row), or
a record with "rows" that carry one each (pare demo's metrics.json; pick one with --row NAME). Accuracies are
printed in percent; the JSON output (--json, metrics.json) holds fractions.
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_subcommand(subparsers, NAME, help="replay a recorded pipeline configuration",
                            description="Run the pipeline of a recorded configuration (JSON or YAML) and print "
                            "the accuracy of each stage on each evaluated split.", epilog=EPILOG)
    # dest "record": the generic --config of the other commands fills flags from a file; here the file *is* the run.
    parser.add_argument("--config", dest="record", metavar="FILE", required=True,
                        help="configuration or record file (JSON or YAML)")
    parser.add_argument("--row", metavar="NAME", help="which row of a record with several")
    parser.add_argument("--out", metavar="DIR", help="write metrics.json and model.safetensors here")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch intra-op threads")
    return parser


def select_config(record: dict[str, Any], row: str | None, source: str) -> PipelineConfig:
    """The configuration held by ``record`` (see the epilog for the three shapes)."""
    if "rows" in record and isinstance(record["rows"], list):
        rows = [r for r in record["rows"] if isinstance(r, dict) and isinstance(r.get("config"), dict)]
        names = [str(r.get("name")) for r in rows]
        if row is None and len(rows) != 1:
            raise ConfigError(f"--config {source} holds {len(rows)} replayable rows; pick one with --row "
                              f"({', '.join(names)})")
        chosen = rows[0] if row is None else next((r for r in rows if str(r.get("name")) == row), None)
        if chosen is None:
            raise ConfigError(f"--config {source}: no row {row!r}; rows: {', '.join(names)}")
        return PipelineConfig.from_dict(chosen["config"])
    if row is not None:
        raise ConfigError(f"--row {row}: {source} holds a single configuration")
    if isinstance(record.get("config"), dict):
        return PipelineConfig.from_dict(record["config"])
    return PipelineConfig.from_dict(record)


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    from pare import report
    from pare.io import save
    from pare.pipeline import run as run_pipeline
    from pare.pipeline.stages import threads

    config = select_config(read_config(args.record), args.row, args.record)
    device = str(common.resolve_device(args.device))
    out = common.prepare_out_dir(args.out, overwrite=args.overwrite) if args.out else None
    console.info(f"running {config.criterion} to {config.target.describe()} ({config.model.name})")
    t0 = time.perf_counter()
    with threads(args.threads):
        result = run_pipeline(config, device=device, out_dir=out, progress=console.progress)
    record = result.record()
    record.update({"kind": "run", "command": common.command_line(argv), "source": args.record, "row": args.row,
                   "wall_seconds": time.perf_counter() - t0})
    if out is not None:
        save(result.model, out / "model.safetensors",
             metadata={"criterion": config.criterion, "budget": config.target.describe(),
                       "input_shape": result.input_shape, "config": config.to_dict()})
        report.write_json(out / report.METRICS_NAME, record)
    rows = [[stage, split, report.pct(m["top1"]), m["n"]]  # type: ignore[arg-type]
            for stage, splits in result.accuracy.items() for split, m in splits.items()]
    console.table(["stage", "split", "top-1", "images"], rows,
                  title=f"{config.criterion} {config.target.describe()}: MACs "
                        f"-{100 * float(result.reduction['macs_reduction']):.2f}%")  # type: ignore[arg-type]
    if out is not None:
        console.out(f"wrote {Path(out) / report.METRICS_NAME} and {Path(out) / 'model.safetensors'}")
    return record
