"""CHIP: channel independence (Sui et al., NeurIPS 2021), methods.md §1.

For one image, let A (c × hw) stack the layer's feature maps, one row per channel. The channel independence of
row j is CI_j = ‖A‖_* − ‖M_j ⊙ A‖_*, the drop of the nuclear norm when row j is zeroed; the score is its mean over
the calibration images.

The definition costs c + 1 SVDs of c × hw per image (:func:`chip_scores_reference`). :func:`chip_scores` computes
the same numbers exactly from one symmetric eigendecomposition per image:

* Zeroing row j of A zeroes row and column j of the Gram G = AAᵀ = U diag(λ) Uᵀ, so ‖M_j A‖_* = tr √(G₋ⱼ) with G₋ⱼ
  the principal submatrix without j.
* √λ = (2/π) ∫₀^∞ λ / (λ + t²) dt turns the trace difference into one integral. With R = (G + t²)⁻¹, the
  Schur complement gives tr R − tr (G₋ⱼ + t²)⁻¹ = (R²)_jj / R_jj, and the integrand simplifies to a ratio of two
  sums of non-negative terms (no cancellation):

      CI_j = (2/π) ∫₀^∞ [Σ_k w_jk λ_k / (λ_k + t²)²] / [Σ_k w_jk / (λ_k + t²)] dt,     w_jk = U_jk².

* In u = ln t the integrand is analytic in the strip |Im u| < π/2 (its poles and zeros sit at t = i√λ_k and
  t = i√μ, μ the eigenvalues of G₋ⱼ), so the trapezoidal rule converges like exp(−π²/h); the tail above the grid
  follows the known asymptote G_jj / t² and is summed in closed form.
* For all channels j and quadrature nodes at once, the two sums are two matrix products W @ F (c × c by c × T),
  batched over images. Cost per image: one c × c eigendecomposition plus O(c²·T) GEMM work, T ≈ 100 nodes.

Exactness: float64 throughout; the quadrature error is below 1e-11 relative. The remaining error is the usual one
of eigenvalues of a Gram matrix, ~√(ε·‖G‖) for eigenvalues that are exactly 0; when c > hw (many such) the thin
SVD of A is used instead, which keeps them at 0. An all-zero row has CI exactly 0 (zeroing it changes nothing)
and is set so rather than computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pare.errors import ConfigError
from pare.graph import Group

from .base import Criterion, ScoreContext, register_criterion
from .stats import feature_sites, stream_maps

#: Quadrature in u = ln(t / σ_max): nodes from σ_max·1e-12 to σ_max·1e4 with step H (106 nodes). Below the grid the
#: integrand is at most 1, so the missing part is < 1e-12·σ_max; above it the closed-form tail is accurate to ~1e-8
#: relative of a part that is itself ≤ 1e-4·σ_max; the step's error is ~exp(−π²/H) ≈ 6e-13 relative.
U_LO = math.log(1e-12)
U_HI = math.log(1e4)
H = 0.35
#: Gram eigenvalues below GRAM_ZERO·c·ε·λ_max count as exact zeros (see _spectrum).
GRAM_ZERO = 16.0


def _as_rows(maps: torch.Tensor) -> torch.Tensor:
    """(N, c, h, w), (N, c, hw) or (N, c) (a fully connected layer: one value per channel) -> (N, c, hw) float64."""
    if maps.dim() < 2:
        raise ValueError(f"CHIP needs maps of shape (N, c, ...), got {tuple(maps.shape)}")
    return maps.reshape(maps.shape[0], maps.shape[1], -1).to(torch.float64)


def chip_scores_reference(maps: torch.Tensor) -> torch.Tensor:
    """CI per image and channel by the definition: zero row j, recompute the nuclear norm (c + 1 SVDs).

    ``maps``: (N, c, h, w) or (N, c, hw). Returns (N, c) float64. As in the official ``calculate_ci.py``, one
    ``svdvals`` per channel (batched over images).
    """
    a = _as_rows(maps)
    full = torch.linalg.svdvals(a).sum(-1)
    out = torch.empty(a.shape[0], a.shape[1], dtype=torch.float64, device=a.device)
    for j in range(a.shape[1]):
        masked = a.clone()
        masked[:, j] = 0
        out[:, j] = full - torch.linalg.svdvals(masked).sum(-1)
    return out


def _spectrum(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues λ (N, K) ≥ 0 of G = AAᵀ and weights w (N, c, K) = U², K poles covering all of ℝ^c.

    c ≤ hw: eigh of the c × c Gram (cheap). c > hw: the thin SVD gives the hw nonzero-capable eigenvalues s² with
    exact left vectors, and the (c − hw)-dimensional null space of G is one pole at 0 with weight 1 − Σ_k U_jk².
    """
    n, c, hw = a.shape
    if c <= hw:
        lam, vec = torch.linalg.eigh(a @ a.mT)
        # Eigenvalues within the Gram's rounding level (~c·ε·λ_max) are zeros of a rank-deficient A (dead or
        # duplicated channels); taking them as computed would add √(rounding) ≈ 1e-7·σ_max each. Setting them
        # to 0 is exact for a truly rank-deficient A and never worse than that √(rounding) otherwise.
        floor = GRAM_ZERO * c * torch.finfo(torch.float64).eps * lam.amax(-1, keepdim=True)
        return torch.where(lam > floor, lam, torch.zeros_like(lam)), vec.pow(2)
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    w = u.pow(2)
    w0 = (1.0 - w.sum(-1, keepdim=True)).clamp_min(0.0)
    lam = torch.cat([s.pow(2), torch.zeros(n, 1, dtype=a.dtype, device=a.device)], dim=1)
    return lam, torch.cat([w, w0], dim=2)


def chip_scores(maps: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """CI per image and channel, equal to :func:`chip_scores_reference` (see the module docstring for how).

    ``maps``: (N, c, h, w) or (N, c, hw), any float dtype. Returns (N, c) float64. ``chunk`` bounds the number of
    images processed together (memory ~ chunk·c·(c + T)·8 bytes).
    """
    a_all = _as_rows(maps)
    out = torch.empty(a_all.shape[0], a_all.shape[1], dtype=torch.float64, device=a_all.device)
    u = torch.arange(U_LO, U_HI + H / 2, H, dtype=torch.float64, device=a_all.device)  # (T,)
    tail = math.exp(-H) / (1.0 - math.exp(-H))  # Σ_{m≥1} e^{−mH}: trapezoid sum of an e^{−u} tail
    for start in range(0, a_all.shape[0], chunk):
        a = a_all[start : start + chunk]
        lam, w = _spectrum(a)  # (n, K), (n, c, K)
        scale = lam.amax(-1).sqrt()  # σ_max, (n,)
        live = scale > 0
        t = scale.clamp_min(torch.finfo(torch.float64).tiny)[:, None] * u.exp()[None, :]  # (n, T)
        inv = (lam[:, :, None] + t.pow(2)[:, None, :]).reciprocal()  # 1/(λ_k + t²): (n, K, T)
        # One GEMM for both sums: [Σ_k w λ/(λ+t²)² | Σ_k w/(λ+t²)], (n, c, 2T).
        both = w @ torch.cat([lam[:, :, None] * inv * inv, inv], dim=2)
        num, dnm = both[..., : u.numel()], both[..., u.numel() :]
        body = ((num / dnm) @ t[:, :, None]).squeeze(-1) * H  # Σ_nodes φ(t)·t·H: ∫ φ(e^u) e^u du
        # Above the grid φ(t)·t ≈ G_jj/t = (G_jj/t_hi)·e^{−(u−u_hi)}; G_jj = Σ_k w_jk λ_k.
        gjj = (w @ lam[:, :, None]).squeeze(-1)
        ci = (2.0 / math.pi) * (body + H * tail * gjj / t[:, -1:])
        ci = torch.where(live[:, None], ci, torch.zeros_like(ci))
        # A zero row: M_j ⊙ A = A, so CI_j = 0 exactly.
        ci = ci.masked_fill(a.abs().amax(-1) == 0, 0.0)
        out[start : start + chunk] = ci
    return out


SCOPES = ("node", "group")


@register_criterion
class CHIP(Criterion):
    """Score of channel i: CI_i = ‖A‖_* − ‖M_i ⊙ A‖_*, averaged over the calibration images (Sui et al. 2021).

    A is the feature map of the group's feature node (post-ReLU after conv/BN; after the residual addition for the
    last conv of a block, like the official ``relu2`` hooks), computed exactly with :func:`chip_scores`.
    ``scope="node"`` (default) takes all channels of that map as A, as CHIP scores a whole layer; ``"group"`` uses
    only the group's channels (they differ only when a map carries several groups, e.g. both sides of a padded
    shortcut). ``round_decimals=4`` rounds the maps first, as the official code does (negligible effect).
    """

    name = "chip"
    summary = "channel independence: drop of the nuclear norm when a channel's map is removed (Sui et al. 2021)"
    evidence = "paper + official code (Eclipsess/CHIP_NeurIPS2021)"
    needs_data = True

    def __init__(self, scope: str = "node", round_decimals: int | None = None, exact: bool = False) -> None:
        if scope not in SCOPES:
            raise ConfigError(f"unknown CHIP scope '{scope}'; choose from {', '.join(SCOPES)}")
        self.scope = scope
        self.round_decimals = round_decimals
        self.exact = exact  # True: the slow per-channel SVD definition (for checking)

    def _ci(self, maps: torch.Tensor) -> torch.Tensor:
        if self.round_decimals is not None:
            maps = torch.round(maps, decimals=self.round_decimals)
        return (chip_scores_reference if self.exact else chip_scores)(maps)

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        sites = feature_sites(ctx.graph, groups)
        sums: dict[str, torch.Tensor] = {}
        by_node: dict[str, list[str]] = {}
        for gid, s in sites.items():
            by_node.setdefault(s.node.name, []).append(gid)

        def update(node: str, out: torch.Tensor) -> None:
            if self.scope == "node":
                sums[node] = sums.get(node, 0) + self._ci(out).sum(0)
                return
            for gid in by_node[node]:
                pos = torch.as_tensor(sites[gid].positions, device=out.device)
                sums[gid] = sums.get(gid, 0) + self._ci(out.index_select(1, pos)).sum(0)

        n = stream_maps(ctx, [s.node for s in sites.values()], update, self.name)
        if self.scope == "node":
            return {gid: (sums[s.node.name].cpu().numpy() / n)[s.positions] for gid, s in sites.items()}
        return {gid: sums[gid].cpu().numpy() / n for gid in sites}
