"""Similarity clustering, reconstructed from the abstract (Zhang, Zhao, Ni, Zhang, Deng, arXiv:1908.02620), §4.

similarity-clustering (reconstructed from the abstract). The paper's formula, linkage, cut and tables are unknown;
what follows is this project's design (methods.md §4.2), not the paper's method.

Distance. Channel i of a conv followed by BN has pre-activation y_i = γ_i·z_i + β_i with z_i standardised. For
input patches of isotropic covariance, corr(z_i, z_j) = cos(w_i, w_j), and

    D²_ij = E[(y_i − y_j)²] = (β_i − β_j)² + γ_i² + γ_j² − 2·γ_i·γ_j·ρ_ij,     ρ_ij = cos(w_i, w_j).

D is the L² distance between the random variables y_i and y_j, hence a Euclidean metric (Ward linkage is valid).
``rho="data"`` estimates ρ_ij instead as the empirical correlation of the pre-BN maps on the calibration data.
A producer without a norm uses γ_i = ‖w_i‖ and β_i = its bias (the same model with unit-variance inputs), so
D²_ij = (b_i − b_j)² + ‖w_i − w_j‖².

Selection. Per group, agglomerative clustering of D (scipy; average linkage by default, single/complete/ward as
options) cut at exactly k = size − n_remove clusters; each cluster keeps one representative (max |γ| by default,
or the medoid) and the rest are removed. :func:`merge_into_representatives` optionally folds each removed
channel's outgoing weights into its representative (exact for channels equal up to a positive scale).

Residual groups (several producers) are skipped by default (``residual="skip"``: absent from :meth:`score`'s
result, so they are not pruned); ``residual="first"`` clusters them on their first producer and its norm;
``residual="sum"`` (methods.md §4.2 "compute D on the group-summed statistics") sums D² over the producers, i.e.
clusters the concatenation of every producer's output (still a Euclidean distance), with γ the L² norm of the
producers' γ (representative and score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from torch import nn

from pare.errors import ConfigError, PruneError
from pare.graph import ChannelGraph, Group

from ._common import member_slices, norm_modules, norm_param
from .base import Criterion, ScoreContext, register_criterion
from .stats import producer_sites, stream_maps

LINKAGES = ("average", "single", "complete", "ward")
REPRESENTATIVES = ("max_gamma", "medoid")
RHOS = ("weights", "data")
RESIDUAL = ("skip", "first", "sum")


def similarity_distance(gamma: np.ndarray, beta: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """D²_ij = (β_i − β_j)² + γ_i² + γ_j² − 2·γ_i·γ_j·ρ_ij.

    ``gamma``, ``beta``: (c,); ``rho``: (c, c) correlations. Returns (c, c) float64, symmetric, ≥ 0 (rounding
    below 0 is clipped), exactly 0 on the diagonal.
    """
    g = np.asarray(gamma, dtype=np.float64)
    b = np.asarray(beta, dtype=np.float64)
    r = np.asarray(rho, dtype=np.float64)
    d2 = (b[:, None] - b[None, :]) ** 2 + g[:, None] ** 2 + g[None, :] ** 2 - 2.0 * g[:, None] * g[None, :] * r
    d2 = np.maximum((d2 + d2.T) / 2.0, 0.0)
    np.fill_diagonal(d2, 0.0)
    return d2


def cosine_matrix(w: torch.Tensor) -> np.ndarray:
    """cos(w_i, w_j) of flattened filters ``w`` (c, k) -> (c, c) float64; a zero filter is orthogonal to all."""
    w = w.to(torch.float64)
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (unit @ unit.T).clamp(-1.0, 1.0).numpy()


def cut_clusters(d2: np.ndarray, k: int, linkage: str = "average") -> list[list[int]]:
    """Agglomerative clustering of the squared distances ``d2`` (c, c), cut at exactly ``k`` clusters.

    The first c − k merges of the linkage are applied (``fcluster(maxclust)`` can return fewer clusters on ties).
    Returns the clusters as sorted index lists, ordered by their smallest index.
    """
    c = d2.shape[0]
    if not 1 <= k <= c:
        raise ConfigError(f"cannot cut {c} channels into {k} clusters")
    if linkage not in LINKAGES:
        raise ConfigError(f"unknown linkage '{linkage}'; choose from {', '.join(LINKAGES)}")
    if k == c:
        return [[i] for i in range(c)]
    z = hierarchy.linkage(squareform(np.sqrt(d2), checks=False), method=linkage)
    parent = list(range(2 * c - 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for step in range(c - k):
        a, b = int(z[step, 0]), int(z[step, 1])
        parent[find(a)] = c + step
        parent[find(b)] = c + step
    clusters: dict[int, list[int]] = {}
    for i in range(c):
        clusters.setdefault(find(i), []).append(i)
    return sorted(clusters.values(), key=lambda m: m[0])


def representatives(
    clusters: Sequence[Sequence[int]], gamma: np.ndarray, d2: np.ndarray, how: str = "max_gamma"
) -> dict[int, list[int]]:
    """Representative -> members (including itself) of each cluster. ``max_gamma``: largest |γ| (lowest index on
    ties); ``medoid``: smallest summed distance to the cluster's other members."""
    if how not in REPRESENTATIVES:
        raise ConfigError(f"unknown representative '{how}'; choose from {', '.join(REPRESENTATIVES)}")
    out: dict[int, list[int]] = {}
    for members in clusters:
        idx = np.asarray(members, dtype=np.int64)
        if how == "max_gamma":
            rep = int(idx[np.argmax(np.abs(gamma[idx]))])
        else:
            rep = int(idx[np.argmin(np.sqrt(d2[np.ix_(idx, idx)]).sum(1))])
        out[rep] = sorted(int(i) for i in idx)
    return out


def merge_into_representatives(
    model: nn.Module, graph: ChannelGraph, gid: str, clusters: Mapping[int, Sequence[int]]
) -> None:
    """Fold each removed channel's outgoing consumer weights into its representative, in place, before surgery.

    ``clusters``: representative -> members (as from :meth:`SimilarityClustering.cluster`). For a member j of
    representative r, every consumer weight slice of r gets ``+ s·W[..., j, ...]`` with s = γ_j / γ_r (1 without a
    norm). Exact when j's activation is s times r's (same standardised pre-activation, β_j = s·β_r, s > 0, a
    positively homogeneous activation such as ReLU): then the consumers see the same input after j is removed.
    Only conv-BN-activation groups whose consumers are conv/linear weights are supported.
    """
    group = graph.group(gid)
    producers = {m.module for m in group.producers()}
    if len(producers) != 1:
        raise PruneError(f"merge: group '{gid}' has {len(producers)} producers; only single-producer groups merge")
    bad = [m for m in group.members if m.role not in ("out", "norm", "in")]
    if bad:
        raise PruneError(f"merge: group '{gid}' has a '{bad[0].role}' member ({bad[0].module}); merging is not exact")
    norms = norm_modules(group)
    if len(norms) > 1:
        raise PruneError(f"merge: group '{gid}' has several norms; merging is not exact")
    gamma = norm_param(model, group, norms[0], "weight") if norms else np.ones(group.size)
    consumers = [m for m in group.members if m.role == "in"]
    with torch.no_grad():
        for rep, members in clusters.items():
            for j in members:
                if j == rep:
                    continue
                if gamma[rep] == 0:
                    raise PruneError(f"merge: representative {rep} of group '{gid}' has γ = 0")
                s = float(gamma[j] / gamma[rep])
                for m in consumers:
                    w = getattr(model.get_submodule(m.module), m.param)
                    dst = w.narrow(m.dim, m.offset + rep * m.stride, m.stride)
                    src = w.narrow(m.dim, m.offset + j * m.stride, m.stride)
                    dst.add_(src, alpha=s)


@register_criterion
class SimilarityClustering(Criterion):
    """similarity-clustering (reconstructed from the abstract): cluster channels by a Gaussian-model distance of
    their outputs and keep one representative per cluster (methods.md §4.2; a design, not the paper's formula).

    Options: ``linkage`` (average | single | complete | ward), ``representative`` (max_gamma | medoid), ``rho``
    ("weights": cos of the filters, data-free; "data": correlation of the pre-BN maps on ``ctx.data``),
    ``residual`` (skip | first | sum). :meth:`score` returns |γ| per channel (so budget allocation can rank groups);
    :meth:`select` does the clustering.
    """

    name = "similarity"
    summary = "similarity-clustering (reconstructed from the abstract): hierarchical clustering of BN/filter distance"
    evidence = "reconstructed from the abstract (arXiv:1908.02620; methods.md §4.2 design)"

    def __init__(
        self, linkage: str = "average", representative: str = "max_gamma", rho: str = "weights",
        residual: str = "skip",
    ) -> None:
        for value, allowed, what in ((linkage, LINKAGES, "linkage"), (representative, REPRESENTATIVES,
                                     "representative"), (rho, RHOS, "rho"), (residual, RESIDUAL, "residual")):
            if value not in allowed:
                raise ConfigError(f"unknown similarity {what} '{value}'; choose from {', '.join(allowed)}")
        self.linkage = linkage
        self.representative = representative
        self.rho = rho
        self.residual = residual
        self.needs_data = rho == "data"  # instance override of the class flag
        self._rho_cache: dict[str, np.ndarray] = {}
        self.last_clusters: dict[str, dict[int, list[int]]] = {}

    # -- per-group statistics -----------------------------------------------------------------------------------

    def handles(self, group: Group) -> bool:
        """Whether the group is clustered (single producer, or residual='first'; whole-channel blocks)."""
        if group.block > 1:
            return False
        return len({m.module for m in group.producers()}) == 1 or self.residual != "skip"

    def _gamma_beta_weights(self, model: nn.Module, group: Group) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """(γ (c,), β (c,), filters (c, k)) of the group's first producer and the norm that follows it."""
        producer = next(m for m in group.producers() if m.param == "weight")
        w = member_slices(model, producer, group.size)
        norms = norm_modules(group)
        if norms:
            return norm_param(model, group, norms[0], "weight"), norm_param(model, group, norms[0], "bias"), w
        return self._no_norm(model, group, producer.module, w)

    @staticmethod
    def _no_norm(model: nn.Module, group: Group, module: str, w: torch.Tensor
                 ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        # Without a norm: γ = ‖w_i‖ and β = the bias (unit-variance inputs), see the module doc.
        bias = next((m for m in group.producers() if m.module == module and m.param == "bias"), None)
        beta = member_slices(model, bias, group.size)[:, 0].numpy() if bias is not None else np.zeros(group.size)
        return w.norm(dim=1).numpy(), beta, w

    def _producer_stats(self, ctx: ScoreContext, group: Group
                        ) -> list[tuple[str, np.ndarray, np.ndarray, torch.Tensor]]:
        """Per producer module: (module, γ (c,), β (c,), filters (c, k)), each with the norm that directly
        follows that producer in the traced graph (γ = ‖w_i‖, β = bias without one)."""
        norms = set(norm_modules(group))
        out = []
        for producer in group.producers():
            if producer.param != "weight" or any(o[0] == producer.module for o in out):
                continue
            w = member_slices(ctx.model, producer, group.size)
            node = next(n for n in ctx.graph.gm.graph.nodes if n.op == "call_module" and n.target == producer.module)
            norm = next((str(u.target) for u in node.users if u.op == "call_module" and u.target in norms), None)
            if norm is not None:
                gamma, beta = norm_param(ctx.model, group, norm, "weight"), norm_param(ctx.model, group, norm, "bias")
                out.append((producer.module, gamma, beta, w))
            else:
                out.append((producer.module, *self._no_norm(ctx.model, group, producer.module, w)))
        return out

    def _data_rho(self, ctx: ScoreContext, groups: Sequence[Group]) -> None:
        """Correlation (c, c) of each group's first producer output (pre-BN) over all calibration pixels."""
        sites = {}
        for g in groups:
            every = producer_sites(ctx.graph, g)
            for site in every if self._summed(g) else every[:1]:
                key = f"{g.id}@{site.node.target}"
                if key not in self._rho_cache:
                    sites[key] = site
        if not sites:
            return
        acc: dict[str, list[torch.Tensor | int]] = {}

        def update(node: str, out: torch.Tensor) -> None:
            # Streaming first and second moments over batch and spatial positions: (C,), (C, C), count.
            x = out.movedim(1, -1).reshape(-1, out.shape[1]).to(torch.float64)
            if node not in acc:
                acc[node] = [torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], x.shape[1],
                             dtype=torch.float64), 0]
            s1, s2, n = acc[node]
            acc[node] = [s1 + x.sum(0).cpu(), s2 + (x.T @ x).cpu(), n + x.shape[0]]

        stream_maps(ctx, [s.node for s in sites.values()], update, self.name)
        for key, site in sites.items():
            s1, s2, n = acc[site.node.name]
            mean = s1 / n
            cov = s2 / n - torch.outer(mean, mean)
            pos = torch.as_tensor(site.positions)
            cov = cov[pos][:, pos]
            std = cov.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
            self._rho_cache[key] = (cov / torch.outer(std, std)).clamp(-1.0, 1.0).numpy()

    def _summed(self, group: Group) -> bool:
        return self.residual == "sum" and len({m.module for m in group.producers()}) > 1

    def _rho(self, ctx: ScoreContext, group: Group, module: str, w: torch.Tensor) -> np.ndarray:
        if self.rho == "data":
            self._data_rho(ctx, [group])
            return self._rho_cache[f"{group.id}@{module}"]
        return cosine_matrix(w)

    def distances(self, ctx: ScoreContext, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """(D² (c, c), γ (c,)) of one group; with ``residual="sum"`` on a multi-producer group, D² is summed over
        the producers and γ is the L² norm over the producers' γ."""
        if self._summed(group):
            stats = self._producer_stats(ctx, group)
            d2 = sum(similarity_distance(g, b, self._rho(ctx, group, mod, w)) for mod, g, b, w in stats)
            gamma = np.sqrt(sum(g ** 2 for _, g, _, _ in stats))
            return np.asarray(d2, dtype=np.float64), gamma
        gamma, beta, w = self._gamma_beta_weights(ctx.model, group)
        producer = next(m for m in group.producers() if m.param == "weight")
        return similarity_distance(gamma, beta, self._rho(ctx, group, producer.module, w)), gamma

    # -- criterion API ------------------------------------------------------------------------------------------

    def score(self, ctx: ScoreContext, groups: Sequence[Group]) -> dict[str, np.ndarray]:
        """|γ| per channel of every handled group; skipped groups (residual sums by default) are absent."""
        handled = [g for g in groups if self.handles(g)]
        self.last_clusters = {}
        if self.rho == "data":
            # Fresh statistics for this model state; select() then reuses them (one calibration pass in all).
            self._rho_cache = {}
            self._data_rho(ctx, handled)
        out: dict[str, np.ndarray] = {}
        for g in handled:
            if self._summed(g):
                out[g.id] = np.sqrt(sum(gm ** 2 for _, gm, _, _ in self._producer_stats(ctx, g)))
            else:
                out[g.id] = np.abs(self._gamma_beta_weights(ctx.model, g)[0])
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def cluster(self, ctx: ScoreContext, group: Group, n_remove: int) -> dict[int, list[int]]:
        """Representative -> members for ``size − n_remove`` clusters of the group's channels."""
        if not self.handles(group):
            raise ConfigError(f"similarity: group '{group.id}' is skipped (residual='{self.residual}', "
                              f"block={group.block})")
        d2, gamma = self.distances(ctx, group)
        clusters = cut_clusters(d2, group.size - n_remove, self.linkage)
        return representatives(clusters, gamma, d2, self.representative)

    def select(self, ctx: ScoreContext, group: Group, scores: np.ndarray, n_remove: int) -> np.ndarray:
        """Indices (ascending) of the ``n_remove`` non-representatives; the clusters are kept in
        ``last_clusters[group.id]`` for :func:`merge_into_representatives`."""
        if n_remove <= 0:
            return np.zeros(0, dtype=np.int64)
        reps = self.cluster(ctx, group, n_remove)
        self.last_clusters[group.id] = reps
        removed = sorted(j for rep, members in reps.items() for j in members if j != rep)
        return np.asarray(removed, dtype=np.int64)
