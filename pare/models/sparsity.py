"""Parser for the HRank / CHIP layer-wise sparsity strings, e.g. ``[0.]+[0.15]*2+[0.4]*27``.

The string is a ``+``-separated list of terms ``[p]*n`` (or ``[p]``, meaning ``n = 1``) that expands to a list
of per-layer pruning ratios, exactly as the official code's ``eval`` of the string does (methods.md §1.4).
Each ratio ``p`` removes a fraction of a layer's channels: the kept width is ``int(C * (1 - p))`` (the floor,
in double precision). What each entry of the list means is model-specific; the model families document it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from torch import nn

from pare.errors import BudgetError, ConfigError

# One term: "[<float>]" optionally followed by "*<count>". The float accepts the forms Python writes
# ("0.", ".5", "0.15", "1e-1"); the count is a positive decimal integer.
_TERM = re.compile(r"^\[\s*([0-9]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?)\s*\](?:\s*\*\s*([0-9]+))?$")


def parse_sparsity(text: str) -> list[float]:
    """Expand a sparsity string such as ``"[0.]+[0.15]*2+[0.4]*27"`` into a list of ratios (here 30 floats).

    Raises :class:`ConfigError` naming the offending term when the string is malformed, a count is zero, or a
    ratio is outside ``[0, 1)``.
    """
    if not isinstance(text, str):
        raise ConfigError(f"sparsity string must be a str, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise ConfigError("sparsity string is empty; expected terms like '[0.]+[0.4]*2'")
    ratios: list[float] = []
    for position, raw_term in enumerate(stripped.split("+")):
        term = raw_term.strip()
        match = _TERM.match(term)
        if match is None or match.group(1) in ("", "."):
            raise ConfigError(
                f"sparsity string {text!r}: term {position + 1} {term!r} is not of the form '[p]' or '[p]*n'"
            )
        ratio = float(match.group(1))
        count = 1 if match.group(2) is None else int(match.group(2))
        if count < 1:
            raise ConfigError(f"sparsity string {text!r}: term {term!r} repeats {count} times; need n >= 1")
        _check_ratio(ratio, f"sparsity string {text!r}, term {term!r}")
        ratios.extend([ratio] * count)
    return ratios


def resolve_sparsity(value: str | Sequence[float], expected_len: int, model_name: str) -> list[float]:
    """Turn a sparsity string or a list of ratios into a validated list of exactly ``expected_len`` floats."""
    if isinstance(value, str):
        ratios = parse_sparsity(value)
    elif isinstance(value, Sequence):
        ratios = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ConfigError(f"{model_name}: sparsity[{index}] = {item!r} is not a number")
            ratio = float(item)
            _check_ratio(ratio, f"{model_name}: sparsity[{index}]")
            ratios.append(ratio)
    else:
        raise ConfigError(
            f"{model_name}: sparsity must be a string like '[0.]+[0.4]*2' or a list of floats, "
            f"got {type(value).__name__}"
        )
    if len(ratios) != expected_len:
        raise ConfigError(f"{model_name}: sparsity has {len(ratios)} entries, expected {expected_len}")
    return ratios


def kept_width(channels: int, ratio: float, what: str) -> int:
    """``int(channels * (1 - ratio))`` as the official code computes it; refuses a width of 0."""
    width = int(channels * (1 - ratio))
    if width < 1:
        raise ConfigError(
            f"{what}: sparsity {ratio} leaves {width} of {channels} channels; at least 1 must stay"
        )
    return width


def _check_ratio(ratio: float, where: str) -> None:
    if not math.isfinite(ratio) or ratio < 0.0 or ratio >= 1.0:
        raise ConfigError(f"{where}: ratio {ratio} is outside [0, 1)")


def producer_ratios(model: nn.Module, sparsity: str | Sequence[float], model_name: str | None = None
                    ) -> dict[str, float]:
    """Per producer module path, the CHIP/HRank ratio that a sparsity string assigns (methods.md §1.4), as the
    model's family defines it (:class:`pare.models.registry.SparsitySemantics`).

    ``model_name`` defaults to the zoo name recorded by :func:`pare.models.create` (``model.pare_zoo``).
    Raises BudgetError for a model whose family gives sparsity strings no meaning.
    """
    from pare.models.registry import get_entry, list_models

    name = model_name or getattr(model, "pare_zoo", {}).get("name")
    semantics = get_entry(name).sparsity if isinstance(name, str) and name in list_models(True) else None
    if semantics is None:
        known = [n for n in list_models() if get_entry(n).sparsity is not None]
        raise BudgetError(
            f"sparsity strings have semantics only for zoo models {', '.join(known)}; got {name!r} "
            "(build the model with pare.models.create or pass model_name)"
        )
    canonical = get_entry(name).name
    return semantics.producer_map(model, resolve_sparsity(sparsity, semantics.length(canonical), canonical))
