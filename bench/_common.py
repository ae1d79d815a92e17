"""What every benchmark record carries: the commit it ran at and the machine it ran on.

Imported by the scripts in this folder as ``from _common import ...`` (they are run as ``python bench/x.py``,
which puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_dirty(untracked: bool = True) -> bool:
    """True when files differ from HEAD, untracked files included (or git cannot tell): the record's commit then
    does not hold the code that ran. ``untracked=False`` looks at tracked files only. Benchmark outputs
    (bench/results, docs/results, docs/benchmarks.md) do not count: a run rewrites them itself."""
    out = _git("status", "--porcelain", f"--untracked-files={'normal' if untracked else 'no'}", "--", ".",
               ":(exclude)bench/results", ":(exclude)docs/results", ":(exclude)docs/benchmarks.md")
    return True if out is None else bool(out)


def git_commit(mark_dirty: bool = False) -> str:
    """HEAD's hash (``"unknown"`` outside a checkout); ``mark_dirty`` appends ``+uncommitted`` if files differ."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    return commit + ("+uncommitted" if mark_dirty and commit != "unknown" and git_dirty() else "")


def environment() -> dict[str, Any]:
    """Versions and machine facts for a result record."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
