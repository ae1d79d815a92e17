"""Options from a file: ``--config FILE`` (JSON, or YAML through PyYAML) fills the flags a command line does not
give (the command line wins), converted and checked like the flags themselves."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

from pare.errors import ConfigError

# Budget flags: one given on the command line replaces the file's budget, whichever kind each is.
BUDGET_DESTS = ("reduce_macs", "reduce_params", "channel_ratio", "sparsity", "reduce_latency")


def read_config(path: str | Path) -> dict[str, Any]:
    """A JSON (.json) or YAML file holding one flat mapping of option names to values."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {file}: no such file")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"--config {file}: not valid JSON ({exc})") from None
    else:
        try:
            import yaml  # PyYAML: the optional extra pare[yaml] (in pare[all])
        except ImportError:
            raise ConfigError(f"--config {file}: reading YAML needs PyYAML (pip install 'pare[yaml]'); or give "
                              "the options as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {file}: not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {file}: expected a mapping of option names to values, got "
                          f"{type(data).__name__}")
    return data


def apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict[str, Any],
                 source: str) -> None:
    """Fill ``args`` from ``config`` for every option not given on the command line (the command line wins).

    A budget given on the command line replaces the file's budget, whichever kind each is.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    explicit = {dest for dest, action in actions.items()
                if getattr(args, dest, action.default) != action.default}
    cli_budget = bool(explicit & set(BUDGET_DESTS))
    for raw_key, value in config.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key)
        if action is None:
            options = sorted(k.replace("_", "-") for k in actions)
            close = difflib.get_close_matches(str(raw_key).replace("_", "-"), options, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config {source}: unknown option '{raw_key}'{hint}")
        if key in explicit or (cli_budget and key in BUDGET_DESTS):
            continue
        setattr(args, key, _convert(action, value, raw_key, source))


def _convert(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    where = f"--config {source}: option '{key}'"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, item, where) for item in items]
    if value is None:
        return None
    return _convert_one(action, value, where)


def _convert_one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and action.type is not None):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value
