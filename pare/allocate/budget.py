"""Pruning budgets: what fraction of a model to remove, named with its unit.

"reduction" always means the fraction *removed* (0.5 = half the MACs gone), never the fraction kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from pare.errors import BudgetError
from pare.models.sparsity import parse_sparsity

_FRACTION_FIELDS = ("macs_reduction", "params_reduction", "channel_ratio")


@dataclass(frozen=True)
class Budget:
    """Exactly one of:

    * ``macs_reduction``: fraction of the model's MACs (under the counting convention in use) to remove;
    * ``params_reduction``: fraction of the parameters (BN affine included) to remove;
    * ``channel_ratio``: fraction of each prunable group's channels to remove (uniform allocation) or of all
      allowed channels (global allocation);
    * ``sparsity``: a CHIP/HRank sparsity string (``"[0.]+[0.15]*2+[0.4]*27"``), replayed on a zoo model.

    Fractions must lie in [0, 1); anything else raises :class:`BudgetError` at construction.
    """

    macs_reduction: float | None = None
    params_reduction: float | None = None
    channel_ratio: float | None = None
    sparsity: str | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            listed = ", ".join(given) if given else "none"
            raise BudgetError(
                "Budget needs exactly one of macs_reduction, params_reduction, channel_ratio, sparsity; "
                f"got {listed}"
            )
        name = given[0]
        value = getattr(self, name)
        if name in _FRACTION_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BudgetError(f"Budget.{name} must be a number in [0, 1), got {value!r}")
            if not 0.0 <= float(value) < 1.0:
                raise BudgetError(f"Budget.{name} = {value} is outside [0, 1) (it is the fraction removed)")
        else:
            try:
                parse_sparsity(value)
            except Exception as exc:  # ConfigError from the parser; re-raised as a budget problem
                raise BudgetError(f"Budget.sparsity: {exc}") from exc

    @property
    def kind(self) -> str:
        """The name of the field that is set."""
        return next(f.name for f in fields(self) if getattr(self, f.name) is not None)

    @property
    def value(self) -> float | str:
        return getattr(self, self.kind)

    def describe(self) -> str:
        """Short label, e.g. ``macs_reduction=0.5``."""
        return f"{self.kind}={self.value}"
