"""The sparsity-training / selection methods of :mod:`pare.methods`, one line each, for ``pare criteria``.

Unlike the criteria (:mod:`pare.criteria`), these are not one-shot scores: each needs its own training run
(a penalty or an extra layer), so ``pare prune --criterion`` does not accept them. The registry only describes
them; the evidence level states how much of each is taken from the paper and how much is this project's design.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass

from pare.errors import ConfigError
from pare.methods import dacp


@dataclass(frozen=True)
class MethodInfo:
    """One training method: ``name`` (short key), ``label`` (human name), one-line ``summary``, ``evidence``
    (paper / paper + official code / reconstructed from the abstract) and the implementing ``module``."""

    name: str
    label: str
    summary: str
    evidence: str
    module: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo(
            name="ista",
            label="ISTA on BatchNorm scales (Ye et al., ICLR 2018)",
            summary="proximal soft-threshold on BN γ during training, then remove γ == 0 channels with their "
            "constant output folded into the consumers",
            evidence="paper",
            module="pare.methods.ista",
        ),
        MethodInfo(
            name="slimming",
            label="Network Slimming (Liu et al., ICCV 2017)",
            summary="L1 subgradient on BN γ during training, then one global |γ| threshold",
            evidence="paper + official code",
            module="pare.methods.slimming",
        ),
        MethodInfo(
            name="dacp",
            label=dacp.LABEL,
            summary=dacp.SUMMARY,
            evidence="reconstructed from the abstract",
            module="pare.methods.dacp",
        ),
        MethodInfo(
            name="maxplus",
            label="max-plus filter selection (Zhang et al., ISMM 2019)",
            summary="a max-plus layer after the classifier; filters that are (almost) never the argmax are "
            "removed",
            evidence="paper",
            module="pare.methods.maxplus",
        ),
    )
}


def list_methods() -> list[MethodInfo]:
    """The registered training methods, sorted by name."""
    return [METHODS[name] for name in sorted(METHODS)]


def get_method(name: str) -> MethodInfo:
    """The method called ``name``; :class:`ConfigError` with close names when unknown."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown training method '{name}'{hint}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
