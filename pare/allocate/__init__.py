"""Budgets and allocation: how many channels each group loses, and which.

See :mod:`pare.allocate.strategies` (uniform, global, sparsity strings, constraints),
:mod:`pare.allocate.dispatch` (the table of allocations) and :mod:`pare.allocate.search` (exact analytic cost
model and the MACs/params target search). The allocator sees groups and costs only: model knowledge lives in
:mod:`pare.models`, orchestration (:func:`pare.prune`, :func:`pare.prune_latency.prune_to_latency`) above.
"""

from pare.allocate.budget import Budget
from pare.allocate.dispatch import ALLOCATIONS, ALLOCATORS, AllocationRequest, allocation_order
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
    ratio_plan,
    select_indices,
    sparsity_plan,
    uniform_order,
)

__all__ = [
    "ALLOCATIONS",
    "ALLOCATORS",
    "COUPLED_POLICIES",
    "NORMALIZATIONS",
    "AllocationRequest",
    "Budget",
    "Constraints",
    "Cost",
    "CostModel",
    "allocation_order",
    "allowed_counts",
    "eligible_groups",
    "floor_allowed",
    "global_order",
    "is_internal",
    "is_protected",
    "normalize_scores",
    "plan_at",
    "producer_modules",
    "ratio_plan",
    "search_order",
    "select_indices",
    "sparsity_plan",
    "uniform_order",
]
