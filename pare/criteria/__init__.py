"""Channel-importance criteria. Importing this package registers every built-in criterion.

Data-free: ``l1``, ``l2``, ``fpgm``, ``bn_scale``, ``random``, ``similarity`` (reconstructed from the abstract).
Data-driven (calibration set in ``ScoreContext.data``): ``hrank``, ``chip``, ``taylor`` (needs labels).
"""

from __future__ import annotations

from .base import (
    AGGREGATES,
    Batch,
    Criterion,
    ScoreContext,
    aggregate,
    get_criterion,
    list_criteria,
    register_criterion,
)
from .bn_scale import BNScale
from .chip import CHIP, chip_scores, chip_scores_reference
from .fpgm import FPGM, fpgm_scores
from .hrank import HRank, map_ranks
from .l1 import L1Norm, greedy_pruned_inputs
from .l2 import L2Norm
from .random_ import RandomCriterion
from .recon import ReconstructionSelection
from .similarity import (
    SimilarityClustering,
    cut_clusters,
    merge_into_representatives,
    similarity_distance,
)
from .stats import Site, feature_sites, stream_maps, stream_maps_with_grad
from .taylor import TaylorFOBN, gate_contribution

__all__ = [
    "AGGREGATES",
    "CHIP",
    "FPGM",
    "BNScale",
    "Batch",
    "Criterion",
    "HRank",
    "L1Norm",
    "L2Norm",
    "RandomCriterion",
    "ReconstructionSelection",
    "ScoreContext",
    "SimilarityClustering",
    "Site",
    "TaylorFOBN",
    "aggregate",
    "chip_scores",
    "chip_scores_reference",
    "cut_clusters",
    "feature_sites",
    "fpgm_scores",
    "gate_contribution",
    "get_criterion",
    "greedy_pruned_inputs",
    "list_criteria",
    "map_ranks",
    "merge_into_representatives",
    "register_criterion",
    "similarity_distance",
    "stream_maps",
    "stream_maps_with_grad",
]
