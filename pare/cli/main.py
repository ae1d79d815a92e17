"""``pare`` entry point: builds the argument parser, dispatches to a subcommand, turns errors into one line.

Exit codes: 0 success; 2 bad input or usage (missing/corrupt file, unknown name, impossible budget, bad
option, ...): one ``pare: error: ...`` line on stderr; 1 an unexpected internal error (a bug; ``--debug``
shows the traceback); 130 interrupted; 141 stdout closed early (``pare ... | head``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tarfile
import traceback
import zipfile
from collections.abc import Sequence
from typing import Any

from pare.cli import bench, count, criteria, demo, evaluate, export, prune, run, train
from pare.cli._common import Console, HelpFormatter, Parser, UsageError, global_flags
from pare.cli._outdir import discard_empty_out_dirs, forget_out_dirs
from pare.cli.config_file import apply_config, read_config
from pare.errors import PareError

COMMANDS = (demo, prune, run, train, evaluate, count, export, bench, criteria)

EPILOG = """\
examples:
  pare demo                                   # no download, under a minute: every criterion on digits
  pare criteria                               # the pruning criteria and training methods
  pare prune --model resnet56 --weights resnet56.th --data cifar-10-batches-py \\
      --normalization imagenet --criterion chip --reduce-macs 0.5 --out runs/r56-chip
  pare run --config runs/r56-chip/metrics.json # replay a recorded configuration (any benchmark row too)
  pare eval runs/r56-chip/model.safetensors --data cifar-10-batches-py
  pare count runs/r56-chip/model.safetensors
  pare bench runs/r56-chip/model.safetensors resnet56 --input-size 3x32x32 --batch-sizes 1,16

exit codes: 0 success, 2 bad input or usage (one 'pare: error:' line), 1 internal error, 130 interrupted,
141 stdout closed early (e.g. piped into head).
Run 'pare COMMAND --help' for each command's options and examples.
"""

# Errors that mean "bad input" rather than "bug in pare": reported as one line, exit 2.
_INPUT_ERRORS = (PareError, OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, UnicodeDecodeError,
                 json.JSONDecodeError, zipfile.BadZipFile, tarfile.TarError)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the subcommand parsers by name."""
    from pare.version import __version__

    parser = Parser(
        prog="pare",
        description="Structural channel pruning for CNNs: prune, fine-tune, evaluate, count, export, benchmark.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
        parents=[global_flags()],
    )
    parser.add_argument("--version", action="version", version=f"pare {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    commands = {module.NAME: module.add_parser(subparsers) for module in COMMANDS}
    return parser, commands


def _run(argv: list[str], console: Console) -> tuple[int, Any]:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    console.json = bool(getattr(args, "json", False))
    console.quiet = bool(getattr(args, "quiet", False))
    if getattr(args, "config", None):
        apply_config(commands[args.command], args, read_config(args.config), args.config)
    module = next(m for m in COMMANDS if args.command == m.NAME)
    return 0, module.run(args, console, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pare`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    code = _main(list(sys.argv[1:] if argv is None else argv))
    # A failed command leaves no empty --out folder behind.
    if code in (0, 141):
        forget_out_dirs()
    else:
        discard_empty_out_dirs()
    return code


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv
    console = Console(json="--json" in argv, quiet="--quiet" in argv or "-q" in argv)
    try:
        code, result = _run(argv, console)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"pare: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pare: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (`pare ... | head`): not an error of the input; silence the flush at exit.
        _silence_stdout()
        return 141
    except _INPUT_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"pare: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"pare: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the "
              "traceback and please report it)", file=sys.stderr)
        return 1
    try:
        if console.json:
            print(json.dumps(result, indent=2, allow_nan=False, default=str))
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 141
    return code


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in tests)
        pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
