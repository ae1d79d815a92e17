"""timm-style model registry: ``@register_model`` on a factory, ``list_models()``, ``create(name, ...)``.

A factory is a function with keyword-only arguments that returns an ``nn.Module``; it must accept
``num_classes`` and may accept ``sparsity`` and family-specific options. :func:`create` checks the requested
options against the factory's signature, builds the model, and records how it was built in ``model.pare_zoo``
so that the artifact code can rebuild the same skeleton later.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from pare.errors import ConfigError

ModelFactory = Callable[..., nn.Module]
# model, per-layer ratios of a sparsity string -> {producer module path: ratio removed}
SparsityMap = Callable[[nn.Module, Sequence[float]], dict[str, float]]


@dataclass(frozen=True)
class Preprocessing:
    """How the family's pretrained weights expect their inputs (as timm's ``pretrained_cfg``).

    ``normalization``: a preset of :data:`pare.data.NORMALIZATION` (uint8 -> x / 255 -> (x - mean) / std);
    ``input_size``: (C, H, W) of one image, None when the family takes any size (the data decide);
    ``interpolation``: resampling used when images must be resized.
    """

    normalization: str = "none"
    input_size: tuple[int, int, int] | None = None
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class SparsitySemantics:
    """What a CHIP/HRank sparsity string means for a family (methods.md §1.4): how many ratios it holds for a
    model (``length(model_name)``) and which producer module takes which ratio (``producer_map``)."""

    length: Callable[[str], int]
    producer_map: SparsityMap


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its canonical name, factory, default class count, aliases, the preprocessing its
    weights expect and, for families with CHIP/HRank configurations, the meaning of a sparsity string."""

    name: str
    factory: ModelFactory
    default_num_classes: int
    aliases: tuple[str, ...]
    description: str
    preprocessing: Preprocessing = Preprocessing()
    sparsity: SparsitySemantics | None = None


_ENTRIES: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register_model(
    name: str | None = None,
    *,
    num_classes: int = 10,
    aliases: Sequence[str] = (),
    description: str = "",
    preprocessing: Preprocessing = Preprocessing(),
    sparsity: SparsitySemantics | None = None,
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator that registers ``factory`` under ``name`` (default: the function's name) and ``aliases``.

    ``num_classes`` is the default class count used when :func:`create` is not given one; ``preprocessing``
    and ``sparsity`` are the family's knowledge (see :class:`Preprocessing`, :class:`SparsitySemantics`).
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        canonical = name or factory.__name__
        parameters = inspect.signature(factory).parameters
        if "num_classes" not in parameters:
            raise TypeError(f"model factory {canonical!r} must accept a num_classes keyword")
        for key in (canonical, *aliases):
            if key in _ENTRIES or key in _ALIASES:
                raise ValueError(f"model name {key!r} is registered twice")
        doc = description or (inspect.getdoc(factory) or "").split("\n", 1)[0]
        _ENTRIES[canonical] = ModelEntry(canonical, factory, int(num_classes), tuple(aliases), doc,
                                         preprocessing, sparsity)
        for alias in aliases:
            _ALIASES[alias] = canonical
        return factory

    return decorator


def _ensure_families_loaded() -> None:
    # The family modules register themselves on import; pare.models imports all of them.
    importlib.import_module("pare.models")


def list_models(include_aliases: bool = False) -> list[str]:
    """Sorted canonical model names (plus aliases when ``include_aliases``)."""
    _ensure_families_loaded()
    names = list(_ENTRIES)
    if include_aliases:
        names.extend(_ALIASES)
    return sorted(names)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` or an alias; :class:`ConfigError` listing close names when unknown."""
    _ensure_families_loaded()
    canonical = _ALIASES.get(name, name)
    entry = _ENTRIES.get(canonical)
    if entry is None:
        known = sorted([*_ENTRIES, *_ALIASES])
        close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known models: {', '.join(known)}"
        raise ConfigError(f"unknown model {name!r}{hint}")
    return entry


def create(name: str, *, num_classes: int | None = None, sparsity: Any = None, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``.

    Args:
        name: a name from :func:`list_models` or an alias (``vgg16``).
        num_classes: size of the classifier output; ``None`` uses the model's default (10 for CIFAR nets,
            1000 for the ImageNet nets).
        sparsity: an HRank/CHIP sparsity string or list of ratios, for models that support it
            (methods.md §1.4).
        **kwargs: family-specific options (``widths=``, ``width_mult=``, ...), see each factory's docstring.

    Returns:
        The model, with ``model.pare_zoo = {"name": canonical_name, "kwargs": {...}}``: every option needed to
        rebuild it, ``num_classes`` and ``sparsity`` included.
    """
    entry = get_entry(name)
    if num_classes is None:
        num_classes = entry.default_num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{entry.name}: num_classes must be a positive int, got {num_classes!r}")
    parameters = inspect.signature(entry.factory).parameters
    if sparsity is not None and "sparsity" not in parameters:
        raise ConfigError(
            f"{entry.name}: this model does not accept sparsity= (it has no sparsity semantics)"
        )
    accepted = sorted(key for key in parameters if key not in ("num_classes", "sparsity"))
    for key in kwargs:
        if key not in parameters or key in ("num_classes", "sparsity"):
            options = ", ".join(accepted) if accepted else "none"
            raise ConfigError(f"{entry.name}: unknown option {key!r}; accepted options: {options}")
    call_kwargs: dict[str, Any] = {"num_classes": num_classes, **kwargs}
    if "sparsity" in parameters:
        call_kwargs["sparsity"] = sparsity
    model = entry.factory(**call_kwargs)
    # Record the factory defaults too, so the skeleton can be rebuilt even if a default changes later.
    defaults = {
        key: parameter.default
        for key, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    model.pare_zoo = {"name": entry.name, "kwargs": _plain({**defaults, **call_kwargs, "sparsity": sparsity})}
    return model


def _plain(value: Any) -> Any:
    """Tuples become lists, recursively, so the recorded kwargs survive a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
