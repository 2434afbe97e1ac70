"""Spatial domains from an embedding: GMM (mclust-like, no R), k-means or Leiden, one joint
clustering over all slices, optional estimate of K and spatial refinement within slices."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .config import Keys
from .errors import ConfigError, InputError
from .mixture import (KEEP_STARTS, MCLUST_MODELS, N_COMPONENTS, N_STARTS, fit_gmm,
                      medoid_start, merge_components, neighbour_share, partition_fits, potts_em)
from .utils import batch_codes, record, require_obsm

logger = logging.getLogger(__name__)

METHODS = ("gmm", "kmeans", "leiden")
#: default Potts interaction of the GMM caller (the largest log-odds a neighbourhood adds)
SPATIAL_PRIOR = 4.0


def cluster(
    adata: ad.AnnData,
    n_domains: int | None = 7,
    method: str = "gmm",
    use_rep: str | None = None,
    key_added: str = Keys.DOMAIN,
    *,
    batch_key: str = Keys.BATCH,
    n_pcs: int = 30,
    gmm_model: str = "EEE",
    k_range: tuple[int, int] = (2, 15),
    n_starts: int = N_STARTS,
    keep_starts: float = KEEP_STARTS,
    spatial_prior: float = SPATIAL_PRIOR,
    n_components: int | str | None = N_COMPONENTS,
    merge_rep: str = Keys.PCA,
    refine: bool = False,
    max_fit: int = 200_000,
    seed: int = 0,
    copy: bool = False,
) -> ad.AnnData | None:
    """Cluster all slices jointly into spatial domains.

    Parameters
    ----------
    n_domains
        K, the number of domains; ``None`` estimates it by the GMM's BIC over ``k_range``.
    method
        ``"gmm"``: the domain caller of :mod:`spamask_integrate.mixture`: ``n_starts`` seeded
        Gaussian mixtures (``gmm_model`` "EEE" = one shared full covariance, as mclust's
        EEE); of the ``keep_starts`` share with the highest likelihood, the one that agrees
        most with the others, refitted with a Potts prior of strength ``spatial_prior`` over
        each slice's neighbour graph. ``"kmeans"``, or
        ``"leiden"`` (resolution searched to give exactly K).
    use_rep
        Embedding to cluster; default ``X_spamask_harmony`` if present, else ``X_spamask``.
    n_pcs
        The embedding is reduced to this many principal components first (as the reference).
    n_starts, spatial_prior
        GMM starts, and the largest log-odds a spot's neighbours add to a domain (0: none;
        needs ``gmm_model="EEE"``). ``n_starts=1, spatial_prior=0`` is a plain GMM.
    keep_starts
        Share of the starts, those with the highest log-likelihood, among which the most
        typical one is chosen (1: all starts, the caller before 2026-12-06 evening).
    n_components, merge_rep
        The GMM caller fits ``n_components`` (> K) components, then joins them into K
        domains, a pair at a time, where both ``obsm[merge_rep]`` (the model input) and
        ``obsm[use_rep]`` call them alike (Ward's criterion under each view's pooled
        within-component covariance; :func:`~spamask_integrate.mixture.merge_components`).
        ``"auto"`` (default): fit both K components and 2 K joined into K, and keep the
        partition the caller's own model scores higher in ``obsm[merge_rep]``
        (:func:`join_kept`): each spot's log-likelihood under the Gaussian mixture of one
        shared covariance fitted to the partition, plus ``spatial_prior`` times the share
        of its same-slice neighbours in its domain. So a join is kept where it explains
        the expression better by more than the prior charges for a patchier map; one
        kept although patchier (fewer same-slice neighbour pairs in one domain,
        :func:`pair_coherence`) logs a warning naming ``n_components=K`` to compare,
        since where slices cover
        different parts of a tissue such joins have cost accuracy (benchmarks/README.md,
        "When the second platform covers only part of the tissue"). K components without
        ``obsm[merge_rep]`` or a spatial graph. A number M: M components, always joined.
        ``None``: K components, no merge. Why: a smoothed embedding's thick layers are cut
        into slabs by K components, which the join repairs (the slabs of one layer share
        their expression, so the joined domains fit it far better); where the 2 K
        components do not follow the domains (noisy, weakly separated ones, or a large
        region cut along its own spread of expression), the join's map is patchier and
        its expression fit gains too little to pay for that (benchmarks/README.md, "The
        join kept where the caller's own model scores it higher").
    refine
        Relabel each spot by majority vote of its spatial neighbours in its own slice
        (``obs[key_added + "_unrefined"]`` keeps the labels before).
    max_fit
        The final GMM and k-means are fitted on at most this many spots (a seeded sample)
        and predict all, so a million spots cost minutes, not hours.

    The result depends on the spots, not on their order: the work is done in the order of
    the spot names and mapped back.

    Reads ``obsm[use_rep]``; with ``spatial_prior`` or ``refine``,
    ``obsp["spamask_connectivities"]`` or ``obsm["spatial"]``. Writes ``obs[key_added]``
    (categorical, K levels), ``uns["spamask"]["cluster"]``.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: use one of {', '.join(METHODS)}")
    if n_domains is not None and int(n_domains) < 2:
        raise ConfigError(f"n_domains={n_domains}: must be at least 2")
    if gmm_model not in MCLUST_MODELS:
        raise ConfigError(f"gmm_model={gmm_model!r}: use one of {', '.join(MCLUST_MODELS)}")
    check_caller(n_starts, keep_starts, spatial_prior, n_components)
    auto = n_components == "auto"
    if not auto and n_components is not None and method != "gmm":
        raise ConfigError(f"n_components={n_components} needs method='gmm' (got {method!r})")
    if method == "gmm" and spatial_prior > 0 and gmm_model != "EEE":
        raise ConfigError(f"spatial_prior needs gmm_model='EEE' (got {gmm_model!r}); "
                          "or pass spatial_prior=0")
    if use_rep is None:
        use_rep = Keys.EMB_HARMONY if Keys.EMB_HARMONY in adata.obsm else Keys.EMB
    require_obsm(adata, use_rep, "train a model (and integrate) first")
    if n_domains is not None and n_domains > adata.n_obs:
        raise ConfigError(f"n_domains={n_domains}: more than the {adata.n_obs} spots")
    adata = adata.copy() if copy else adata
    order = np.argsort(adata.obs_names.to_numpy(dtype=str), kind="stable")  # canonical order
    emb = adata.obsm[use_rep]
    x = reduce(emb[order], n_pcs, seed)
    params: dict = {"method": method, "use_rep": use_rep, "n_pcs": int(x.shape[1]), "seed": seed}
    if n_domains is None:
        n_domains, bic = estimate_k(x, k_range, gmm_model, seed, max_fit)
        params.update(k_estimated=True, k_method="gmm-bic", k_range=list(k_range),
                      bic=np.asarray(bic))
        logger.info("cluster: K=%d estimated by BIC over %s", n_domains, k_range)
    n_domains = int(n_domains)
    check = False  # auto: fit K and 2 K, keep the one the caller's model scores higher
    if auto:
        n_components = None
        has_space = Keys.CONNECTIVITIES in adata.obsp or Keys.SPATIAL in adata.obsm
        if method == "gmm" and merge_rep in adata.obsm and has_space:
            n_components, check = 2 * n_domains, True
        elif method == "gmm":
            logger.info("cluster: no obsm[%r] to join components in, or no spatial graph to "
                        "compare partitions on: %d components, no merge",
                        merge_rep if merge_rep not in adata.obsm else Keys.SPATIAL, n_domains)
    if n_components is not None and int(n_components) < n_domains:  # K given or estimated
        raise ConfigError(f"n_components={n_components}: need at least the {n_domains} domains")
    if n_components is not None:
        require_obsm(adata, merge_rep, "the components are joined into domains there")
    if method == "gmm":
        names = adata.obs[batch_key].astype(str).to_numpy()[order] if batch_key in adata.obs \
            else np.zeros(len(order), dtype=str)
        adj = None
        if spatial_prior > 0 or check:
            adj = same_slice_neighbours(adata, batch_key)[order][:, order]
        share = neighbour_share(adj) if spatial_prior > 0 else None
        n_fit = min(n_domains if n_components is None else int(n_components), adata.n_obs)
        fits = []
        for m in ([n_domains, n_fit] if check else [n_fit]):
            labels, info, resp = _gmm(x, m, gmm_model, seed, max_fit, names, int(n_starts),
                                      float(spatial_prior), share, float(keep_starts),
                                      n_domains)
            info.update(n_components=m, merge_rep="")
            if m > n_domains:
                mapping = merge_components(resp, adata.obsm[merge_rep], n_domains, fitted=emb,
                                           rows=order)
                labels = mapping[labels]
                info.update(merge_rep=merge_rep, merge_fitted=use_rep,
                            merged=[np.flatnonzero(mapping == g).tolist()
                                    for g in range(n_domains)])
                logger.info("cluster: %d mixture components joined into %d domains where "
                            "obsm[%r] and obsm[%r] both call them alike", m, n_domains,
                            merge_rep, use_rep)
            fits.append((labels, info))
        if check:  # keep the partition the caller's own model scores higher
            (k_labels, k_info), (m_labels, m_info) = fits
            keep_merge, fit = join_kept(adj, adata.obsm[merge_rep], k_labels, m_labels,
                                        n_domains, beta=float(spatial_prior), rows=order)
            labels, info = (m_labels, m_info) if keep_merge else (k_labels, k_info)
            info.update(merge_checked=True, merge_kept=bool(keep_merge))
            for name, pair in fit.items():
                info.update({f"{name}_k": pair[0], f"{name}_merged": pair[1]})
            coherence = fit["coherence"]
            logger.info("cluster: with %d components / %d joined, a spot scores %.4f / %.4f "
                        "under the caller's model in obsm[%r] (log-likelihood %.4f / %.4f, "
                        "plus %g x its neighbours' share in its domain, %.4f / %.4f): keeping "
                        "the %s", n_domains, n_fit, *fit["score"], merge_rep, *fit["loglik"],
                        spatial_prior, *fit["neighbours"],
                        "joined components" if keep_merge else f"{n_domains} components")
            if keep_merge and coherence[1] < coherence[0]:
                logger.warning(
                    "cluster: the joined domains were kept although they are patchier in "
                    "space than the %d components' (same-slice neighbours in one domain "
                    "%.4f against %.4f): their expression fits obsm[%r] better by more than "
                    "spatial_prior=%g charges for that. Where slices cover different parts "
                    "of a tissue such a join has cost accuracy; compare n_components=%d "
                    "(`--n-components %d`)", n_domains, coherence[1], coherence[0],
                    merge_rep, spatial_prior, n_domains, n_domains)
        else:
            labels, info = fits[0]
        params.update(gmm_model=gmm_model, **info)
    elif method == "kmeans":
        labels = _kmeans(x, n_domains, seed, max_fit)
    else:
        labels, resolution = _leiden(x, n_domains, seed)
        params["resolution"] = resolution
    labels = _relabel_by_size(labels)
    labels = labels[np.argsort(order)]  # back to the AnnData's order
    if refine:
        adata.obs[f"{key_added}_unrefined"] = _categorical(labels, n_domains)
        labels = refine_labels(adata, labels, batch_key=batch_key)
    adata.obs[key_added] = _categorical(labels, n_domains)
    params.update(n_domains=n_domains, refine=bool(refine), key_added=key_added)
    record(adata, "cluster", params)
    return adata if copy else None


def check_caller(n_starts: int, keep_starts: float, spatial_prior: float,
                 n_components: int | str | None = N_COMPONENTS) -> None:
    """Raise ``ConfigError`` for settings the GMM caller cannot use (``run`` checks them
    before the training, not after it)."""
    if not (n_components is None or n_components == "auto"
            or (isinstance(n_components, (int, np.integer)) and not isinstance(n_components, bool)
                and n_components >= 2)):
        raise ConfigError(f"n_components={n_components!r}: use an integer >= 2, 'auto' or None")
    if not 0.0 < float(keep_starts) <= 1.0:
        raise ConfigError(f"keep_starts={keep_starts}: must be above 0 and at most 1")
    if int(n_starts) < 1 or spatial_prior < 0:
        raise ConfigError(f"n_starts={n_starts}, spatial_prior={spatial_prior}: need "
                          "n_starts >= 1 and spatial_prior >= 0")


def reduce(x, n_pcs: int | None, seed: int) -> np.ndarray:
    """``x`` as float64, reduced to ``n_pcs`` principal components if it has more columns."""
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    if n_pcs and x.shape[1] > n_pcs:
        from sklearn.decomposition import PCA

        x = PCA(n_pcs, random_state=seed).fit_transform(x)
    return x


def _sample(n: int, max_fit: int, seed: int) -> np.ndarray:
    if n <= max_fit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False))


def _gmm_fit(x: np.ndarray, k: int, model: str, seed: int, max_fit: int):
    fit = x[_sample(len(x), max_fit, seed)]
    return fit_gmm(fit, k, model, seed), fit


def _mean_agreement(agree: np.ndarray) -> float:
    """Mean ARI between different starts (off the diagonal); 1 for a single start."""
    return float(agree[~np.eye(len(agree), dtype=bool)].mean()) if len(agree) > 1 else 1.0


def _gmm(x: np.ndarray, k: int, model: str, seed: int, max_fit: int, groups: np.ndarray,
         n_starts: int, spatial_prior: float, share, keep_starts: float = KEEP_STARTS,
         n_domains: int | None = None) -> tuple[np.ndarray, dict, np.ndarray]:
    """The mixture of ``k`` components on ``x`` (canonical order): medoid start, then the
    Potts EM; returns the labels, what to record and the responsibilities. ``n_domains``
    (default ``k``): the domains the components will be joined into; the starts' agreement
    warns of unsharp domains only when they are the domains themselves."""
    gmm, agree, kept = medoid_start(x, groups, k, model=model, n_starts=n_starts, seed=seed,
                                    fit_spots=min(max_fit, 20_000), keep=keep_starts)
    if len(x) > 20_000:  # the starts saw a sample: refit the chosen one on max_fit spots
        fit = x[_sample(len(x), max_fit, seed)]
        gmm = fit_gmm(fit, k, model, seed, weights_init=gmm.weights_, means_init=gmm.means_,
                      precisions_init=gmm.precisions_)
    info = {"n_starts": n_starts, "keep_starts": keep_starts, "kept_starts": int(len(kept)),
            "spatial_prior": spatial_prior, "start_agreement": _mean_agreement(agree),
            "kept_agreement": _mean_agreement(agree[np.ix_(kept, kept)])}
    merged = n_domains is not None and n_domains < k
    logger.info("cluster: %d GMM starts of %d components agree at mean ARI %.2f (the %d "
                "likeliest, which choose the start, at %.2f)%s", n_starts, k,
                info["start_agreement"], len(kept), info["kept_agreement"],
                "; the components are joined into domains next" if merged
                else "" if info["start_agreement"] >= 0.8 else
                f"; {k} domains are not sharply defined in this embedding, so expect other "
                "seeds or K to move them")
    resp = gmm.predict_proba(x)
    if spatial_prior > 0:
        resp, em = potts_em(x, share, resp, spatial_prior)
        info.update(em)
        logger.info("cluster: the spatial (Potts) EM %s after %d iterations; its last step "
                    "changed the domain of %d spots", "converged" if em["potts_converged"]
                    else "stopped at its limit", em["potts_iterations"], em["potts_switched"])
    return resp.argmax(axis=1), info, resp


def estimate_k(x: np.ndarray, k_range: tuple[int, int], model: str, seed: int,
               max_fit: int) -> tuple[int, list[float]]:
    """K with the lowest BIC of a GMM fitted for each K in ``k_range`` (inclusive)."""
    lo, hi = int(k_range[0]), int(k_range[1])
    if lo < 2 or hi < lo:
        raise ConfigError(f"k_range={k_range}: need 2 <= low <= high")
    bic = []
    for k in range(lo, hi + 1):
        gmm, fit = _gmm_fit(x, k, model, seed, max_fit)
        bic.append(float(gmm.bic(fit)))
    return lo + int(np.argmin(bic)), bic


def _kmeans(x: np.ndarray, k: int, seed: int, max_fit: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    km = KMeans(k, n_init=10, random_state=seed).fit(x[_sample(len(x), max_fit, seed)])
    return km.predict(x)


def _leiden(x: np.ndarray, k: int, seed: int, n_neighbors: int = 15,
            max_steps: int = 40) -> tuple[np.ndarray, float]:
    """Leiden on a kNN graph of ``x``; bisect the resolution until exactly ``k`` clusters."""
    import igraph as ig
    import leidenalg
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    nn = NearestNeighbors(n_neighbors=min(n_neighbors, n - 1) + 1).fit(x)
    _, idx = nn.kneighbors(x)
    src = np.repeat(np.arange(n), idx.shape[1] - 1)
    dst = idx[:, 1:].ravel()
    graph = ig.Graph(n=n, edges=np.c_[src, dst].tolist(), directed=False).simplify()

    def run(res: float) -> np.ndarray:
        part = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition,
                                        resolution_parameter=res, seed=seed)
        return np.asarray(part.membership)

    lo, hi = 1e-3, 10.0
    best = None
    for _ in range(max_steps):
        res = float(np.sqrt(lo * hi))
        labels = run(res)
        found = labels.max() + 1
        if found == k:
            return labels, res
        if best is None or abs(found - k) < abs(best[0].max() + 1 - k):
            best = (labels, res)
        lo, hi = (res, hi) if found < k else (lo, res)
    raise ConfigError(f"leiden: no resolution in [0.001, 10] gives exactly {k} clusters "
                      f"(closest {best[0].max() + 1} at {best[1]:.4g}); use method='gmm'")


def pair_coherence(adj: sp.spmatrix, labels: np.ndarray) -> float:
    """Share of the neighbour pairs of ``adj`` (same-slice spatial neighbours, in the order of
    ``labels``) whose two spots are in the same domain: how coherent in space a partition is.
    (The run's metric ``neighbour_agreement`` averages each spot's own share instead.)"""
    coo = sp.coo_matrix(adj)
    if coo.nnz == 0:
        return 1.0
    return float(np.mean(labels[coo.row] == labels[coo.col]))


def join_kept(adj: sp.spmatrix, view, k_labels: np.ndarray, joined: np.ndarray, k: int, *,
              beta: float = SPATIAL_PRIOR, rows: np.ndarray | None = None
              ) -> tuple[bool, dict[str, list[float]]]:
    """The check of ``n_components="auto"``: of the K components' ``k_labels`` and the
    ``joined`` domains, keep the partition the caller's own model scores higher.

    Each spot is scored as the spatial (Potts) EM scores a domain for it: the log-likelihood
    of its row of ``view`` (the model input; ``rows`` maps the labels' order to its rows)
    under the Gaussian mixture of one shared covariance fitted to the partition, plus
    ``beta`` (the caller's ``spatial_prior``) times the share of its same-slice neighbours
    in ``adj`` that are in its domain; the partition's score is the mean over spots. The
    join is kept only if it scores higher. Returns that, and for both partitions (K, joined)
    ``score`` and its two terms ``loglik`` and ``neighbours``, ``coherence``
    (:func:`pair_coherence`) and ``distinct`` (the Fisher ratio in ``view``)."""
    partitions = [k_labels, joined]
    fits = partition_fits(view, partitions, k, rows=rows)
    share = neighbour_share(adj)
    coo = share.tocoo()
    n = max(len(k_labels), 1)
    neighbours = [float(np.sum(coo.data * (p[coo.row] == p[coo.col]))) / n for p in partitions]
    loglik = [f[1] for f in fits]
    score = [ll + beta * s for ll, s in zip(loglik, neighbours)]
    return score[1] > score[0], {
        "score": score, "loglik": loglik, "neighbours": neighbours,
        "coherence": [pair_coherence(adj, p) for p in partitions],
        "distinct": [f[0] for f in fits]}


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..K-1 from largest to smallest, so labels do not depend on init."""
    uniq, counts = np.unique(labels, return_counts=True)
    order = uniq[np.argsort(-counts, kind="stable")]
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[order] = np.arange(len(order))
    return mapping[labels]


def _categorical(labels: np.ndarray, k: int) -> pd.Categorical:
    return pd.Categorical.from_codes(labels, categories=[str(i) for i in range(k)])


def same_slice_neighbours(adata: ad.AnnData, batch_key: str = Keys.BATCH,
                          k: int | None = None) -> sp.csr_matrix:
    """Spatial neighbour matrix restricted to pairs in the same slice (no self-loops).

    Uses ``obsp["spamask_connectivities"]`` when present (dropping any cross-slice edge), else
    a ``k``-nearest-neighbour graph per slice (``k`` default 6).
    """
    codes = batch_codes(adata, batch_key)
    if Keys.CONNECTIVITIES in adata.obsp and k is None:
        adj = sp.coo_matrix(adata.obsp[Keys.CONNECTIVITIES])
    else:
        from .graph import _slice_edges

        require_obsm(adata, Keys.SPATIAL)
        rows, cols = [], []
        xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)
        for code in np.unique(codes):
            idx = np.flatnonzero(codes == code)
            s, d = _slice_edges(xy[idx, :2], str(code), "knn", min(k or 6, len(idx) - 1), None)
            rows.append(idx[s])
            cols.append(idx[d])
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        adj = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(adata.n_obs,) * 2)
    keep = (codes[adj.row] == codes[adj.col]) & (adj.row != adj.col)
    return sp.csr_matrix((np.ones(keep.sum()), (adj.row[keep], adj.col[keep])),
                         shape=(adata.n_obs,) * 2)


def refine_labels(adata: ad.AnnData, labels: np.ndarray, *, batch_key: str = Keys.BATCH,
                  k: int | None = None) -> np.ndarray:
    """Majority vote of each spot's same-slice spatial neighbours (a tie keeps the label)."""
    labels = np.asarray(labels)
    if labels.shape != (adata.n_obs,):
        raise InputError(f"labels: expected {adata.n_obs} labels, got {labels.shape}")
    adj = same_slice_neighbours(adata, batch_key, k)
    n_labels = int(labels.max()) + 1
    onehot = sp.csr_matrix((np.ones(len(labels)), (np.arange(len(labels)), labels)),
                           shape=(len(labels), n_labels))
    votes = (adj @ onehot).toarray()
    top = votes.argmax(axis=1)
    own = votes[np.arange(len(labels)), labels]
    return np.where(votes.max(axis=1) > own, top, labels)
