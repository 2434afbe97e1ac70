"""Scores of a run as one tidy table: domain accuracy against labels (per slice and overall),
label-free spatial coherence, and scib-metrics integration scores per embedding."""

from __future__ import annotations

import functools
import gc
import logging
from contextlib import contextmanager

import anndata as ad
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from .cluster import same_slice_neighbours
from .config import Keys
from .errors import ConfigError, InputError
from .utils import (batch_codes, exact_knn, h5ad_safe, import_with_numba_cache, require_obs,
                    require_obsm)

logger = logging.getLogger(__name__)

COLUMNS = ["kind", "scope", "embedding", "metric", "value"]
# Seconds of scib-metrics for E embeddings scoring n spots: about C0 + E * B * n**2 on the
# 2-core machine (benchmarks/scib_cost.py, a fresh process per point, 3 embeddings: 60 s at
# 2,000 spots and 89 s at 4,000 on 4 slices; 62 s and 92 s on 352 slices of 10^6 spots). C0
# is paid once per process: importing umap and pynndescent (~15 s), numba compiling umap's
# fuzzy graph, JAX compiling each metric for the sample's shapes; the quadratic part is the
# silhouettes' pairwise distances and kBET's diffusion maps. scib_max_spots="auto" takes the
# largest sample this model puts within SCIB_SECONDS, between SCIB_MIN_SPOTS and
# SCIB_MAX_SPOTS.
SCIB_COST = (52.0, 8.1e-7)
SCIB_SECONDS = 100.0
SCIB_MIN_SPOTS = 2_000
SCIB_MAX_SPOTS = 20_000
_ACCURACY = {
    "ARI": skm.adjusted_rand_score,
    "NMI": skm.normalized_mutual_info_score,
    "homogeneity": skm.homogeneity_score,
    "completeness": skm.completeness_score,
}


def evaluate(
    adata: ad.AnnData,
    label_key: str | None = None,
    batch_key: str = Keys.BATCH,
    embedding_keys: list[str] | None = None,
    *,
    domain_key: str = Keys.DOMAIN,
    scib: bool = True,
    pre_integrated_key: str | None = Keys.PCA,
    scib_max_spots: int | str = "auto",
    seed: int = 0,
) -> pd.DataFrame:
    """Score domains and embeddings.

    Parameters
    ----------
    label_key
        Ground-truth column; spots with a missing label are left out of the accuracy scores
        (their count is reported as ``n_unlabelled``). Without it only the label-free scores
        and (with the domains as labels) the scib batch scores are computed.
    embedding_keys
        ``obsm`` keys scored by scib-metrics' Benchmarker (bio conservation, batch correction,
        total = 0.6 bio + 0.4 batch). Default: those of ``X_pca``, ``X_spamask``,
        ``X_spamask_harmony`` that exist.
    pre_integrated_key
        Unintegrated embedding for scib's PCR comparison (computed by scanpy if absent).
    scib_max_spots
        Above this, scib scores a seeded sample stratified by slice (``seed``); the table
        says how many spots were scored (``scib_n_spots``). ``"auto"``: the sample that a
        cost model (:data:`SCIB_COST`, measured on 2 cores) puts at about
        :data:`SCIB_SECONDS` for all the embeddings, at least 2,000 and at most 20,000 spots
        (``scib_sample_auto`` = 1 in the table).

    Returns
    -------
    A DataFrame with columns ``kind`` ("domain", "spatial", "integration", "info"), ``scope``
    (a slice name or "all"), ``embedding``, ``metric`` and ``value``; also stored in
    ``uns["spamask"]["metrics"]``.
    """
    require_obs(adata, batch_key)
    require_obs(adata, domain_key)
    if label_key is not None:
        require_obs(adata, label_key)
    rows: list[dict] = []
    slices = list(adata.obs[batch_key].cat.categories)
    codes = batch_codes(adata, batch_key)
    domains = adata.obs[domain_key].astype(str).to_numpy()
    if label_key is not None:
        rows += _accuracy_rows(adata.obs[label_key], domains, codes, slices)
    rows += _spatial_rows(adata, domains, codes, slices, batch_key)
    if scib:
        keys = embedding_keys if embedding_keys is not None else [
            k for k in (Keys.PCA, Keys.EMB, Keys.EMB_HARMONY) if k in adata.obsm]
        for key in keys:
            require_obsm(adata, key)
        if keys:
            auto = scib_max_spots == "auto"
            max_spots = scib_sample_size(len(keys)) if auto else scib_max_spots
            if not auto and (isinstance(max_spots, bool) or not isinstance(
                    max_spots, (int, np.integer))):
                raise ConfigError(f"scib_max_spots={scib_max_spots!r}: give 'auto' or a "
                                  "number of spots")
            rows += scib_rows(adata, keys, label_key or domain_key, batch_key,
                              pre_integrated_key=pre_integrated_key, max_spots=int(max_spots),
                              seed=seed, labels_are_domains=label_key is None)
            if auto:
                rows.append(_row("info", "all", "scib_sample_auto", 1))
    table = pd.DataFrame(rows, columns=COLUMNS)
    adata.uns.setdefault(Keys.UNS, {})["metrics"] = h5ad_safe(
        {f"{r.kind}|{r.scope}|{r.embedding}|{r.metric}": float(r.value)
         for r in table.itertuples()})
    return table


def metrics_table(adata: ad.AnnData) -> pd.DataFrame:
    """The table :func:`evaluate` returned, read back from ``uns["spamask"]["metrics"]``
    (for instance from a saved ``integrated.h5ad``)."""
    stored = adata.uns.get(Keys.UNS, {}).get("metrics")
    if stored is None:
        raise InputError(f'uns["{Keys.UNS}"]["metrics"] not found: run evaluate() first')
    rows = [dict(zip(COLUMNS[:-1], key.split("|")), value=float(value))
            for key, value in stored.items()]
    return pd.DataFrame(rows, columns=COLUMNS)


def _row(kind: str, scope: str, metric: str, value: float, embedding: str = "") -> dict:
    return {"kind": kind, "scope": scope, "embedding": embedding, "metric": metric,
            "value": float(value)}


def _accuracy_rows(labels: pd.Series, domains: np.ndarray, codes: np.ndarray,
                   slices: list[str]) -> list[dict]:
    known = labels.notna().to_numpy() & (labels.astype(str).str.lower() != "nan").to_numpy()
    # integer codes: the scores only compare partitions, and scikit-learn's np.unique on
    # strings sorted them again for every slice and score (41 s of 43 at 10^6 spots)
    truth = pd.factorize(labels.astype(str).to_numpy())[0]
    found = pd.factorize(np.asarray(domains))[0]
    rows = [_row("info", "all", "n_unlabelled", (~known).sum())]
    if (~known).any():
        logger.info("evaluate: %d spots without a label left out of ARI/NMI", (~known).sum())
    order = np.argsort(codes, kind="stable")  # spots grouped by slice, in slice order
    per_slice = np.split(order, np.searchsorted(codes[order], np.arange(1, len(slices))))
    scopes = [("all", np.flatnonzero(known))] + [
        (s, idx[known[idx]]) for s, idx in zip(slices, per_slice)]
    for scope, idx in scopes:
        if len(idx) == 0:
            continue
        for name, fn in _ACCURACY.items():
            rows.append(_row("domain", scope, name, fn(truth[idx], found[idx])))
    return rows


def spatial_coherence(adata: ad.AnnData, domains: np.ndarray, batch_key: str) -> pd.DataFrame:
    """Per spot: share of its same-slice spatial neighbours in its own domain."""
    adj = same_slice_neighbours(adata, batch_key)
    codes = pd.factorize(domains)[0]
    coo = adj.tocoo()
    agree = (codes[coo.row] == codes[coo.col]).astype(float)
    same_counts = np.bincount(coo.row, weights=agree, minlength=adata.n_obs)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    share = np.divide(same_counts, degree, out=np.ones_like(degree, dtype=float),
                      where=degree > 0)
    return pd.DataFrame({"agreement": share, "isolated": share < 0.5}, index=adata.obs_names)


def _spatial_rows(adata: ad.AnnData, domains: np.ndarray, codes: np.ndarray,
                  slices: list[str], batch_key: str) -> list[dict]:
    per_spot = spatial_coherence(adata, domains, batch_key)
    chaos = _chaos(adata, domains, codes, slices)
    rows = []
    scopes = [("all", np.ones(adata.n_obs, dtype=bool))] + [
        (s, codes == i) for i, s in enumerate(slices)]
    for scope, mask in scopes:
        rows.append(_row("spatial", scope, "neighbour_agreement",
                         per_spot["agreement"].to_numpy()[mask].mean()))
        rows.append(_row("spatial", scope, "PAS", per_spot["isolated"].to_numpy()[mask].mean()))
        parts = chaos.get(scope, [])
        if parts:
            rows.append(_row("spatial", scope, "CHAOS",
                             np.average([c for c, _ in parts], weights=[w for _, w in parts])))
    return rows


def _chaos(adata: ad.AnnData, domains: np.ndarray, codes: np.ndarray,
           slice_names: list[str]) -> dict:
    """CHAOS: mean distance of each spot to its nearest same-domain spot (scaled coordinates)."""
    from sklearn.neighbors import KDTree

    if Keys.SPATIAL not in adata.obsm:
        return {}
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    out: dict = {"all": []}
    for code, name in enumerate(slice_names):
        in_slice = codes == code
        pts = xy[in_slice]
        pts = (pts - pts.mean(axis=0)) / np.where(pts.std(axis=0) > 0, pts.std(axis=0), 1)
        dom = domains[in_slice]
        dists, weights = [], []
        for d in np.unique(dom):
            p = pts[dom == d]
            if len(p) <= 2:
                continue
            dd, _ = KDTree(p).query(p, k=2)
            dists.append(dd[:, 1].sum())
            weights.append(len(p))
        value = (sum(dists) / sum(weights)) if weights else np.nan
        out[name] = [(value, in_slice.sum())]
        out["all"].append((value, in_slice.sum()))
    return out


def scib_rows(adata: ad.AnnData, keys: list[str], label_key: str, batch_key: str, *,
              pre_integrated_key: str | None, max_spots: int, seed: int,
              labels_are_domains: bool = False) -> list[dict]:
    """scib-metrics Benchmarker totals and single metrics for each embedding in ``keys``."""
    Benchmarker = import_with_numba_cache("scib_metrics.benchmark").Benchmarker
    if max_spots < 50:
        raise ConfigError(f"scib_max_spots={max_spots}: must be at least 50")
    idx = stratified_sample(batch_codes(adata, batch_key), max_spots, seed)
    obs = adata.obs.iloc[idx][[batch_key, label_key]].copy()
    obs = obs[obs[label_key].notna()]
    keep = adata.obs_names.get_indexer(obs.index)
    if obs[batch_key].nunique() < 2:
        logger.info("evaluate: one slice, scib integration scores skipped")
        return [_row("info", "all", "scib_skipped_one_slice", 1)]
    obs[label_key] = obs[label_key].astype(str).astype("category")
    obs[batch_key] = obs[batch_key].astype(str).astype("category")
    sub = ad.AnnData(obs=obs)
    for key in keys:
        sub.obsm[key] = np.asarray(adata.obsm[key], dtype=np.float32)[keep]
    pre = pre_integrated_key if pre_integrated_key in adata.obsm else None
    if pre is not None and pre not in keys:
        sub.obsm[pre] = np.asarray(adata.obsm[pre], dtype=np.float32)[keep]
    if pre is None:
        raise InputError("evaluate: scib needs an unintegrated embedding; "
                         f"obsm[{pre_integrated_key!r}] not found")
    bench = Benchmarker(sub, batch_key=batch_key, label_key=label_key, embedding_obsm_keys=keys,
                        pre_integrated_embedding_obsm_key=pre, progress_bar=False, n_jobs=1)
    with _frozen_heap(), _exact_diffusion_neighbours(), _matmul_silhouette_distances():
        bench.prepare(neighbor_computer=_sklearn_neighbors)
        bench.benchmark()
    res = bench.get_results(min_max_scale=False).drop(index="Metric Type", errors="ignore")
    rows = [_row("info", "all", "scib_n_spots", len(obs))]
    if labels_are_domains:
        rows.append(_row("info", "all", "scib_labels_are_domains", 1))
    for key in keys:
        for metric, value in res.loc[key].items():
            rows.append(_row("integration", "all", str(metric), float(value), embedding=key))
    return rows


@contextmanager
def _frozen_heap():
    """Leave the objects that exist now out of garbage collection while scib runs.

    The Benchmarker calls ``gc.collect()`` before each metric of each embedding (27 calls for
    3 embeddings); with torch, scanpy and a large AnnData loaded every call walks millions of
    objects (0.3-0.6 s each on the 2-core machine). Objects created during scoring are still
    collected; the frozen ones return to the collector afterwards.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _exact_diffusion_neighbours():
    """Exact neighbours in kBET's diffusion maps while scib runs.

    scib-metrics' ``kbet_per_label`` embeds each label's spots in a diffusion map and finds
    their neighbours with pynndescent, whose numba kernels compile afresh in every process:
    about 30 of the 48 s kBET took on a 3,000-spot sample of the four DLPFC slices (warm: 1.5
    s). Inside this block that search is scikit-learn's exact one, as for the Benchmarker's
    own neighbour graph (:func:`_sklearn_neighbors`); the module attribute is restored on exit.
    Should a scib-metrics release move it, the block changes nothing.
    """
    try:
        from scib_metrics.utils import _diffusion_nn
        module = _diffusion_nn.nearest_neighbors
        original = module.pynndescent
    except (ImportError, AttributeError):
        yield
        return
    module.pynndescent = _exact_neighbours
    try:
        yield
    finally:
        module.pynndescent = original


@contextmanager
def _matmul_silhouette_distances():
    """Euclidean distances by matrix products in scib's silhouettes while scib runs.

    scib-metrics computes each silhouette's pairwise distances as a map of
    ``sqrt(sum((x - y) ** 2))`` over every pair, which never reaches a matrix-product
    kernel: on a 4,399-spot sample of the four DLPFC slices, 6-8 s per 200- or 256-d
    embedding for ``silhouette_label`` alone (2 threads). Inside this block the distances
    come from ``|x|^2 + |y|^2 - 2 x.y`` on centred data (:func:`_matmul_cdist`; 0.1-0.5 s
    there, the same scores). Silhouette label, silhouette batch and isolated labels all go
    through it. Cosine distances, and a scib-metrics release that moves the function, are
    left as they are.
    """
    try:
        from scib_metrics.utils import _silhouette
        original = _silhouette.cdist
    except (ImportError, AttributeError):
        yield
        return

    def cdist(x, y, metric="euclidean"):
        return _matmul_cdist(x, y) if metric == "euclidean" else original(x, y, metric=metric)

    _silhouette.cdist = cdist
    try:
        yield
    finally:
        _silhouette.cdist = original


def _matmul_cdist(x, y):
    """Euclidean distances between the rows of ``x`` and ``y`` by matrix products (jax).

    Both are centred on ``y``'s mean first (distances do not change), which keeps the norms
    small; squared distances below the rounding of ``|x|^2 + |y|^2`` become 0 (a spot and
    itself, or two equal spots, as in the pairwise form).
    """
    return _jitted_cdist()(x, y)


@functools.cache
def _jitted_cdist():
    import jax
    import jax.numpy as jnp

    def distances(a, b):
        centre = b.mean(axis=0)
        a, b = a - centre, b - centre
        na, nb = (a * a).sum(1)[:, None], (b * b).sum(1)[None, :]
        sq = na + nb - 2.0 * (a @ b.T)
        # below float32's resolution of the sum the difference is rounding: 0, so that a
        # spot's distance to itself is 0 as in the pairwise form (not sqrt(rounding))
        floor = 16 * jnp.finfo(sq.dtype).eps * (na + nb)
        return jnp.sqrt(jnp.where(sq > floor, sq, 0.0))

    return jax.jit(distances)


def _exact_neighbours(x: np.ndarray, n_neighbors: int, **_ignored):
    """pynndescent's signature, scikit-learn's exact answer (each point its own first
    neighbour); more neighbours than points is a ValueError, as kBET expects."""
    from scib_metrics.nearest_neighbors import NeighborsResults

    idx, dist = exact_knn(x, n_neighbors)
    return NeighborsResults(indices=idx, distances=dist)


def scib_sample_size(n_embeddings: int, seconds: float = SCIB_SECONDS) -> int:
    """Spots scib can score within about ``seconds`` for ``n_embeddings`` embeddings, by the
    cost model :data:`SCIB_COST`, clipped to [SCIB_MIN_SPOTS, SCIB_MAX_SPOTS]."""
    fixed, per_spot2 = SCIB_COST
    room = max(seconds - fixed, 0.0) / (max(n_embeddings, 1) * per_spot2)
    return int(np.clip(np.sqrt(room) // 100 * 100, SCIB_MIN_SPOTS, SCIB_MAX_SPOTS))


def stratified_sample(codes: np.ndarray, max_spots: int, seed: int) -> np.ndarray:
    """At most ``max_spots`` indices, the same share of every slice, seeded; sorted."""
    n = len(codes)
    if n <= max_spots:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    share = max_spots / n
    picks = []
    for code in np.unique(codes):
        idx = np.flatnonzero(codes == code)
        picks.append(rng.choice(idx, max(1, int(round(share * len(idx)))), replace=False))
    return np.sort(np.concatenate(picks))


def _sklearn_neighbors(x: np.ndarray, k: int):
    """The Benchmarker's neighbour graph: exact, at most every other spot."""
    return _exact_neighbours(x, min(k, len(x) - 1))
