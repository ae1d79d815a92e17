"""``pare criteria``: the registered pruning criteria and the training methods, one line each."""

from __future__ import annotations

import argparse
from typing import Any

from pare.cli._common import Console, add_subcommand

NAME = "criteria"
EPILOG = """\
examples:
  pare criteria
  pare criteria --json | python -c "import json,sys; print([c['name'] for c in json.load(sys.stdin)['criteria']])"

Criteria score channels in one shot and are used by 'pare prune --criterion NAME'. Training methods need their
own sparsity-training run (see pare.methods) and are listed for reference. 'evidence' states how faithful each
implementation is: paper + official code, paper, or reconstructed from the abstract (this project's design).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return add_subcommand(subparsers, NAME, help="list pruning criteria and training methods",
                          description="List the pruning criteria (for 'pare prune --criterion') and the "
                          "sparsity-training methods, with a one-line summary and evidence level each.",
                          epilog=EPILOG)


def run(args: argparse.Namespace, console: Console, argv: list[str]) -> dict[str, Any]:
    import pare.criteria  # noqa: F401  (the criteria register on import)
    from pare.criteria.base import list_criteria
    from pare.methods.registry import list_methods

    crits = [{"name": c.name, "needs_data": bool(c.needs_data), "evidence": c.evidence, "summary": c.summary}
             for c in list_criteria()]
    methods = [m.to_dict() for m in list_methods()]
    console.table(["criterion", "data", "evidence", "summary"],
                  [[c["name"], "yes" if c["needs_data"] else "no", c["evidence"], c["summary"]] for c in crits],
                  title="Pruning criteria (pare prune --criterion NAME):")
    console.out()
    console.table(["method", "evidence", "summary"], [[m["name"], m["evidence"], m["summary"]] for m in methods],
                  title="Training methods (pare.methods; need a sparsity-training run):")
    return {"criteria": crits, "methods": methods}
