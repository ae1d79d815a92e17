"""The ``pare`` command line: ``pare demo | prune | train | eval | count | export | bench | criteria``.

One module per subcommand, each with ``NAME``, ``add_parser(subparsers)`` and ``run(args, console, argv) ->
dict`` (the JSON result printed with ``--json``); shared helpers in :mod:`pare.cli._common`. The library never
imports this package. Entry point: :func:`pare.cli.main.main`.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line (see :func:`pare.cli.main.main`)."""
    from pare.cli.main import main as _main

    return _main(argv)
