"""Budgets and allocation: how many channels each group loses, and which.

See :mod:`pare.allocate.strategies` (uniform, global, sparsity strings, constraints) and
:mod:`pare.allocate.search` (exact analytic cost model and the MACs/params target search).
"""

from pare.allocate.budget import Budget
from pare.allocate.latency import max_macs_reduction, prune_to_latency
from pare.allocate.search import Cost, CostModel, floor_allowed, plan_at, search_order
from pare.allocate.strategies import (
    COUPLED_POLICIES,
    NORMALIZATIONS,
    Constraints,
    allowed_counts,
    eligible_groups,
    global_order,
    is_internal,
    is_protected,
    normalize_scores,
    producer_modules,
    producer_ratios,
    ratio_plan,
    select_indices,
    sparsity_plan,
    uniform_order,
)

__all__ = [
    "COUPLED_POLICIES",
    "NORMALIZATIONS",
    "Budget",
    "Constraints",
    "Cost",
    "CostModel",
    "allowed_counts",
    "eligible_groups",
    "floor_allowed",
    "global_order",
    "is_internal",
    "is_protected",
    "max_macs_reduction",
    "normalize_scores",
    "plan_at",
    "producer_modules",
    "producer_ratios",
    "prune_to_latency",
    "ratio_plan",
    "search_order",
    "select_indices",
    "sparsity_plan",
    "uniform_order",
]
