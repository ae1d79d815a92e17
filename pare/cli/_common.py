"""Shared pieces of the ``pare`` subcommands: argument groups, console output, output folders, and thin bridges
from flags to the library's loaders (:mod:`pare.pipeline.stages`). Options files: :mod:`pare.cli.config_file`.

The CLI stays thin: everything here parses, loads or formats; the work itself is done by library calls.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pare.checks import check_given_input_size
from pare.cli._outdir import make_out_dir
from pare.data import Normalization
from pare.errors import CheckpointError, ConfigError, DataError
from pare.pipeline.stages import LoadedModel

NORMALIZATIONS = ("cifar", "imagenet", "mnist", "none")


# ------------------------------------------------------------------------------------------------ parsing
class UsageError(Exception):
    """An argparse usage error, turned into one ``pare: error:`` line by :func:`pare.cli.main.main`."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`UsageError` (with a did-you-mean for bad choices) instead of
    printing the usage block and exiting, so that every error is one line."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            choices = [c.strip().strip("'") for c in match.group(2).split(",")]
            close = difflib.get_close_matches(match.group(1), choices, n=3)
            if close:
                message += f"; did you mean {', '.join(close)}?"
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples in epilogs as written and shows defaults."""


def global_flags() -> argparse.ArgumentParser:
    """Parent parser of every subcommand: --json/--debug/--quiet are accepted before or after the subcommand.

    ``default=SUPPRESS`` keeps a subcommand from resetting a flag that was given before it.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print one JSON document on stdout instead of tables")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
    group.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                       help="no progress messages or bars on stderr")
    return parent


def add_subcommand(
    subparsers: Any, name: str, *, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter,
        parents=[global_flags()],
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number; the range check is the library's (Budget raises BudgetError for values outside [0, 1))."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def int_list(text: str) -> list[int]:
    """'1,16' -> [1, 16]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def key_value(text: str) -> tuple[str, Any]:
    """'width=32' -> ('width', 32); the value is read as JSON when it parses, else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def input_size(text: str) -> tuple[int, int, int]:
    """'3x32x32' or '3,32,32' -> (3, 32, 32): channels, height, width of one image."""
    parts = re.split(r"[x,]", text.lower())
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW such as 3x32x32, got {text!r}") from None
    if len(values) != 3 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected CxHxW with positive sizes such as 3x32x32, got {text!r}")
    return values  # type: ignore[return-value]


def command_line(argv: Sequence[str]) -> str:
    """The exact command line, quoted so that it can be pasted into a shell."""
    return shlex.join(["pare", *argv])


# ------------------------------------------------------------------------------------------------ console
@dataclass
class Console:
    """Where output goes: tables and results on stdout (or one JSON document with ``--json``), progress
    messages on stderr (none with ``--quiet``)."""

    json: bool = False
    quiet: bool = False

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"pare: {message}", file=sys.stderr, flush=True)

    def out(self, text: str = "") -> None:
        if not self.json:
            print(text, flush=True)

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
        if self.json:
            return
        if title:
            print(title)
        print(format_table(headers, rows), flush=True)

    @property
    def progress(self) -> bool:
        """Progress bars only for a person at a terminal: not quiet, not --json, stdout and stderr are TTYs
        and the CI environment variable is unset."""
        return (not self.quiet and not self.json and sys.stdout.isatty() and sys.stderr.isatty()
                and not os.environ.get("CI"))

    def bar(self, items: Iterable[Any], desc: str, total: int | None = None) -> Iterator[Any]:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, disable=not self.progress, leave=False, file=sys.stderr)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain fixed-width text table; numbers right-aligned."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    numeric = [all(_looks_numeric(row[i]) for row in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _looks_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,]+\s*(%|ms|s|[kMG]|x)?( \(.*\))?|-", text))


# ------------------------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' -> torch.device; ConfigError when CUDA is requested but absent."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


# -------------------------------------------------------------------------------------------------- model
def add_model_options(parser: argparse.ArgumentParser, *, weights: bool = True) -> None:
    group = parser.add_argument_group("model")
    if weights:
        group.add_argument("--weights", metavar="PATH",
                           help="checkpoint for a zoo model (.th/.pt/.pth read weights-only, or safetensors)")
    group.add_argument("--num-classes", type=positive_int, metavar="N",
                       help="classifier size of a zoo model (default: the data set's class count, else the "
                       "model's default)")
    group.add_argument("--model-option", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="extra zoo constructor option, e.g. width=32 (repeatable)")
    group.add_argument("--input-size", type=input_size, metavar="CxHxW",
                       help="image size for tracing/counting, e.g. 3x32x32 (default: from the data or the "
                       "artifact)")


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    num_classes: int | None = None,
    options: Sequence[tuple[str, Any]] = (),
    seed: int = 0,
) -> LoadedModel:
    """``spec`` is a pare artifact file or a zoo name (+ optional ``weights``), loaded by
    :func:`pare.pipeline.stages.load_model`."""
    from pare.config import ModelConfig
    from pare.pipeline.stages import load_model as load

    return load(ModelConfig(name=spec, weights=weights, options=dict(options), num_classes=num_classes,
                            init_seed=seed))


def example_inputs(shape: tuple[int, int, int], batch: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """Seeded random images (batch, C, H, W) for tracing, counting and timing (the values do not matter)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=gen).to(device or "cpu")


def pick_input_shape(
    given: tuple[int, int, int] | None,
    loaded: LoadedModel | None = None,
    dataset: Any = None,
) -> tuple[int, int, int]:
    """--input-size, else the data set's image size, else the artifact's recorded one, else the model family's;
    ConfigError if none."""
    from pare.models import get_entry

    if given is not None:
        check_given_input_size(given, loaded.model if loaded is not None else None,
                               None if dataset is None else dataset.images.shape[1:])
        return given
    if dataset is not None:
        return tuple(int(v) for v in dataset.images.shape[1:])  # type: ignore[return-value]
    if loaded is not None and loaded.recorded_input_shape is not None:
        return loaded.recorded_input_shape
    zoo = getattr(loaded.model, "pare_zoo", None) if loaded is not None else None
    family = get_entry(zoo["name"]).preprocessing.input_size if isinstance(zoo, dict) else None
    if family is not None:
        return family
    raise ConfigError("cannot tell the input size: pass --input-size CxHxW (e.g. 3x32x32) or --data")


# --------------------------------------------------------------------------------------------------- data
def add_data_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="PATH", required=required,
                       help="data set: CIFAR-10/100 pickle or binary folder, MNIST IDX folder, image folder with "
                       "train/ and test/, JPEG tarball (or its folder), lossless npz, or the name 'digits'")
    group.add_argument("--normalization", choices=NORMALIZATIONS,
                       help="per-channel normalisation preset (default: recorded in the artifact, else the one the "
                       "model family's weights expect, e.g. imagenet for the akamaster CIFAR ResNets)")
    group.add_argument("--mean", type=float_list, metavar="M1,M2,M3", help="override the preset's mean")
    group.add_argument("--std", type=float_list, metavar="S1,S2,S3", help="override the preset's std")
    group.add_argument("--batch-size", type=positive_int, default=256, metavar="N",
                       help="batch size for evaluation and calibration")


def check_paths(args: argparse.Namespace) -> None:
    """Fail fast, before any slow step, on a --weights or --data path that does not exist."""
    from pare.data.registry import KNOWN_NAMES

    weights = getattr(args, "weights", None)
    if weights is not None and not Path(weights).is_file():
        raise CheckpointError(f"--weights {weights}: no such checkpoint file")
    data = getattr(args, "data", None)
    if data is not None and data not in KNOWN_NAMES and not Path(data).exists():
        raise DataError(f"--data {data}: no such file or folder (nor one of the names {', '.join(KNOWN_NAMES)})")


def normalization(args: argparse.Namespace, spec: str, loaded: LoadedModel | None = None) -> Normalization:
    """--normalization (with --mean/--std overrides), else the artifact's recorded one (``loaded``), else the
    preprocessing of the zoo model ``spec``'s family (:func:`pare.pipeline.stages.resolve_normalization`)."""
    from pare.config import DataConfig, ModelConfig
    from pare.pipeline.stages import resolve_normalization

    data = DataConfig(normalization=getattr(args, "normalization", None), mean=getattr(args, "mean", None),
                      std=getattr(args, "std", None))
    recorded = loaded.provenance.get("normalization") if loaded is not None else None
    return resolve_normalization(data, ModelConfig(name=spec), recorded)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- fine-tune
def add_training_options(parser: argparse.ArgumentParser, *, recipe_flag: str) -> None:
    from pare.train import RECIPES

    group = parser.add_argument_group("fine-tuning")
    group.add_argument(recipe_flag, choices=sorted(RECIPES), metavar="RECIPE",
                       help=f"training recipe preset: {', '.join(sorted(RECIPES))}")
    group.add_argument("--epochs", type=positive_int, metavar="N", help="override the recipe's epochs")
    group.add_argument("--lr", type=float, metavar="LR", help="override the recipe's learning rate")
    group.add_argument("--train-batch-size", type=positive_int, metavar="N",
                       help="override the recipe's batch size")
    group.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                       help="seeded share of the training split held out for validation (model selection)")
    group.add_argument("--augment", choices=("cifar", "none"),
                       help="training augmentation (default: cifar crop+flip for colour images >= 32 px, else none)")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted fine-tune from OUT/finetune/checkpoint.pt")


def build_recipe(args: argparse.Namespace, name: str) -> Any:
    from pare.train import get_recipe

    overrides: dict[str, Any] = {"seed": int(args.seed)}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
        if args.epochs <= get_recipe(name).warmup_epochs:
            overrides["warmup_epochs"] = 0
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.train_batch_size is not None:
        overrides["batch_size"] = args.train_batch_size
    recipe = get_recipe(name, **overrides)
    # Milestones past the shortened run would never fire; drop them rather than fail the recipe check.
    if recipe.milestones and max(recipe.milestones) >= recipe.epochs:
        recipe = recipe.replace(milestones=tuple(m for m in recipe.milestones if m < recipe.epochs))
    return recipe


# ------------------------------------------------------------------------------------------ output folder
def prepare_out_dir(path: str | Path, *, overwrite: bool, resume: bool = False, own_kind: str | None = None) -> Path:
    """Create ``path`` or accept it when empty; a non-empty folder needs --overwrite (or --resume), so an
    earlier run's results are never lost by accident. ``own_kind``: a folder whose metrics.json has this
    ``kind`` is this command's own earlier output and may be overwritten (the demo)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    ours = own_kind is not None and _metrics_kind(out / "metrics.json") == own_kind
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume or ours):
        raise ConfigError(f"--out {out} exists and is not empty; pass --overwrite to replace its files, or "
                              "choose another folder")
    return make_out_dir(out)  # only now: a failed check leaves no empty folder; stale temporaries go


def _metrics_kind(path: Path) -> str | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("kind") if isinstance(record, dict) else None
