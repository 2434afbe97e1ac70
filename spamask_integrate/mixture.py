"""The spatial domain caller: a Gaussian mixture with one shared covariance (mclust's EEE),
started many times, kept at its most typical start, then refitted with a Potts prior over
each slice's spatial neighbour graph.

Why each piece (measured on the four DLPFC slices, benchmarks/README.md):

- **One GMM start is a lottery.** On one embedding, starts 0-29 reach mean per-slice ARIs from
  0.528 to 0.644, and no label-free criterion (likelihood, ICL, silhouette, Calinski-Harabasz,
  spatial agreement) ranks the partitions as the labels do.
- **The medoid start** (the partition that agrees most, by ARI, with all the others) is the
  answer most starts converge to. It is the same for every run on the same embedding, and it
  is a real mixture fit (no singleton clusters, unlike cutting a co-association tree).
- **The Potts prior** (mean-field EM: each spot's class log-odds gain ``beta`` times the share
  of its neighbours in that class) re-estimates the mixture with the spatial context instead
  of overruling it afterwards as a majority vote does, so noisy single cells are pulled
  towards their neighbourhood's domain while clear spots keep their own.

Cost is linear in spots: the starts are fitted on a seeded sample of at most ``fit_spots``,
the medoid is chosen on at most ``consensus_spots``, and the spatial EM is sparse (one pass
over the graph's edges per iteration).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.special import logsumexp

logger = logging.getLogger(__name__)

#: sklearn covariance type for each mclust model name
MCLUST_MODELS = {"EEE": "tied", "VVV": "full", "VVI": "diag", "VII": "spherical"}
#: default number of GMM starts of the caller (120 since 2026-12-06, 60 and 20 before:
#: benchmarks/README.md, "120 starts" and "What the 60 starts change")
N_STARTS = 120


def start_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 31-bit seeds derived from ``seed``."""
    return [int(s >> 1) for s in np.random.SeedSequence([int(seed), 7]).generate_state(n)]


def stratified_sample(groups: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``size`` rows, the same share of every group, seeded."""
    n = len(groups)
    if n <= size:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picks = [rng.choice(idx, max(1, int(round(size * len(idx) / n))), replace=False)
             for idx in (np.flatnonzero(groups == g) for g in np.unique(groups))]
    return np.sort(np.concatenate(picks))


def fit_gmm(x: np.ndarray, k: int, model: str, seed: int, **init):
    """One sklearn ``GaussianMixture`` fit (mclust-like settings)."""
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(k, covariance_type=MCLUST_MODELS[model], random_state=seed,
                           reg_covar=1e-5, max_iter=300, **init).fit(x)


def fit_starts(x: np.ndarray, k: int, model: str, seeds: list[int]) -> list:
    """One :func:`fit_gmm` per seed, side by side in as many Python threads as numpy's BLAS
    has, each fit on one thread (BLAS, and OpenMP for the k-means that starts it).

    The fits are small (tens of dimensions, K components), so BLAS threads mostly wait on
    each other: on the four DLPFC slices (11,380 spots, PCA-30, K = 7, AVX-512 kernels,
    2 cores) the 20 starts took 11.7 s with 2 BLAS threads, 6.6 s with one, and 3.5 s with
    one per fit and two fits at a time. Every fit runs on one BLAS thread whatever the
    machine, so the starts do not depend on its core count or on how many run at once
    (with some BLAS kernels a product's rounding depends on the number of threads, and
    sklearn's k-means adds its threads' partial sums in the order they finish).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from .utils import blas_threads

    workers = min(blas_threads(), len(seeds))
    with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: fit_gmm(x, k, model, s), seeds))


def medoid_start(x: np.ndarray, groups: np.ndarray, k: int, *, model: str = "EEE",
                 n_starts: int = N_STARTS, seed: int = 0, fit_spots: int = 20_000,
                 consensus_spots: int = 3000):
    """Fit ``n_starts`` seeded GMMs and return the one whose partition agrees most with the
    others (sum of ARIs on a stratified sample), with the ARIs among starts."""
    fit_idx = stratified_sample(groups, fit_spots, seed)
    fits = fit_starts(x[fit_idx], k, model, start_seeds(seed, n_starts))
    probe = x[stratified_sample(groups, consensus_spots, seed + 1)]
    agree = pairwise_ari(np.stack([g.predict(probe) for g in fits]), k)
    best = int(np.argmax(agree.sum(axis=1)))
    return fits[best], agree


def pairwise_ari(labels: np.ndarray, k: int) -> np.ndarray:
    """Adjusted Rand index between every two rows of ``labels`` (integer codes in [0, k)),
    from one contingency table per pair (``bincount``), as sklearn computes it."""
    m, n = labels.shape

    def pairs(codes, size):  # sum over the table's cells of C(count, 2)
        counts = np.bincount(codes, minlength=size).astype(np.float64)
        return float((counts * (counts - 1.0)).sum() / 2.0)

    sizes = [pairs(row, k) for row in labels]
    total = n * (n - 1.0) / 2.0
    agree = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            expected = sizes[i] * sizes[j] / total
            top = 0.5 * (sizes[i] + sizes[j])
            if top == expected:  # both partitions trivial: sklearn's 1.0
                agree[i, j] = agree[j, i] = 1.0
                continue
            index = pairs(labels[i] * k + labels[j], k * k)
            agree[i, j] = agree[j, i] = (index - expected) / (top - expected)
    return agree


def neighbour_share(adj: sp.spmatrix, dtype=np.float64) -> sp.csr_matrix:
    """Row-normalised adjacency: row i averages over i's neighbours (empty rows stay 0).

    ``dtype`` is that of the whole computation (float32 halves the memory at 10^6 spots)."""
    adj = sp.csr_matrix(adj, dtype=dtype)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    return sp.diags(np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)) @ adj


def potts_em(x: np.ndarray, share: sp.csr_matrix, resp: np.ndarray, beta: float, *,
             max_iter: int = 100, tol: float = 1e-4, reg: float = 1e-6) -> np.ndarray:
    """Mean-field EM of an EEE Gaussian mixture under a Potts prior; returns responsibilities.

    E-step: ``log q_ik = log pi_k + log N(x_i | mu_k, S) + beta * (share @ q)_ik + c_i``;
    M-step: weighted means, one pooled covariance, mixing weights. ``share`` is the
    row-normalised neighbour graph, so ``beta`` is the largest log-odds a neighbourhood can
    add, whatever its size. Starts from ``resp`` (e.g. a fitted GMM's posteriors).
    """
    n, d = x.shape
    gram = x.T @ x
    q = resp
    for _ in range(max_iter):
        nk = q.sum(axis=0) + 1e-12
        means = (q.T @ x) / nk[:, None]
        cov = (gram - (means.T * nk) @ means) / n
        cov += reg * np.trace(cov) / d * np.eye(d)
        prec_means = np.linalg.solve(cov, means.T)  # (d, k)
        loglik = x @ prec_means - 0.5 * np.sum(means.T * prec_means, axis=0) + np.log(nk / n)
        logits = loglik + beta * (share @ q)
        new = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        change = float(np.abs(new - q).max())
        q = new
        if change < tol:
            break
    return q
