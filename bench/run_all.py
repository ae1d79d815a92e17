"""Run every benchmark script (each writes its JSON into bench/results/), then regenerate docs/benchmarks.md.

The benchmarks and their commands are the sections of bench/make_docs.py, so the page always names the command
that this runner executes. A script that is not in bench/ yet is skipped, as is one that needs /work/shared
(``PARE_SHARED``) when that is absent; a script that fails is reported and the others still run. ``--quick``
appends ``--quick`` to the scripts that accept it (the others run as documented).

    python bench/run_all.py [--only engine_speed,chip_macs_table] [--quick] [--dry-run] [--no-docs]

Exit status: 0 when every selected script that was not skipped succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import make_docs  # noqa: E402

SHARED = Path(os.environ.get("PARE_SHARED", REPO.parent / "shared"))


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # "ok", "failed (rc N)", "skipped: <why>", "would run"
    seconds: float
    command: str


def supports_quick(script: Path) -> bool:
    """Whether the script declares a ``--quick`` option (read from its source, without importing it)."""
    return '"--quick"' in script.read_text()


def script_of(section: make_docs.Section) -> Path:
    """The script a section's command runs (several sections may share one script, e.g. bench/accuracy.py)."""
    argv = shlex.split(section.command)
    return BENCH / Path(argv[1]).name if len(argv) > 1 else BENCH / f"{section.name}.py"


def command_for(section: make_docs.Section, quick: bool) -> list[str]:
    """The documented command as an argv, run with this interpreter; ``--quick`` added when asked and supported."""
    argv = shlex.split(section.command)
    if argv and argv[0] == "python":
        argv[0] = sys.executable
    if quick and supports_quick(script_of(section)):
        argv.append("--quick")
    return argv


def run(names: Sequence[str], quick: bool, dry_run: bool, shared: Path) -> list[Outcome]:
    by_name = {s.name: s for s in make_docs.SECTIONS}
    outcomes: list[Outcome] = []
    for name in names:
        sec = by_name[name]
        script = script_of(sec)
        if not script.exists():
            outcomes.append(Outcome(name, f"skipped: bench/{script.name} does not exist yet", 0.0, sec.command))
            continue
        if sec.needs_shared and not shared.exists():
            outcomes.append(Outcome(name, f"skipped: needs {shared} (set PARE_SHARED)", 0.0, sec.command))
            continue
        argv = command_for(sec, quick)
        shown = " ".join(shlex.quote(a) for a in ["python", *argv[1:]])
        if dry_run:
            outcomes.append(Outcome(name, "would run", 0.0, shown))
            continue
        print(f"== {name}: {shown}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(argv, cwd=REPO, check=False).returncode
        status = "ok" if rc == 0 else f"failed (rc {rc})"
        outcomes.append(Outcome(name, status, time.perf_counter() - t0, shown))
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    names = [s.name for s in make_docs.SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--quick", action="store_true", help="pass --quick to the scripts that accept it")
    parser.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    args = parser.parse_args(argv)
    selected = [n.strip() for n in args.only.split(",") if n.strip()] or names
    unknown = [n for n in selected if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    outcomes = run(selected, args.quick, args.dry_run, SHARED)
    print("\nsummary:")
    for o in outcomes:
        took = f" in {o.seconds:.0f} s" if o.seconds else ""
        print(f"  {o.name:<16} {o.status}{took}  ({o.command})")
    if not args.dry_run and not args.no_docs:
        make_docs.main([])
    return 1 if any(o.status.startswith("failed") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
