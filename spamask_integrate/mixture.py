"""The spatial domain caller: a Gaussian mixture with one shared covariance (mclust's EEE),
started many times, kept at its most typical start, then refitted with a Potts prior over
each slice's spatial neighbour graph; also fitted with twice as many components as domains,
joined into domains where the model input and the caller's input agree, and that partition
kept unless it is both patchier in space and less distinct in expression.

Why each piece (measured on the four DLPFC slices, benchmarks/README.md):

- **One GMM start is a lottery.** On one embedding, starts 0-29 reach mean per-slice ARIs from
  0.528 to 0.644, and no label-free criterion (likelihood, ICL, silhouette, Calinski-Harabasz,
  spatial agreement) ranks the partitions as the labels do.
- **The medoid start** (the partition that agrees most, by ARI, with all the others) is the
  answer most starts converge to. It is the same for every run on the same embedding, and it
  is a real mixture fit (no singleton clusters, unlike cutting a co-association tree).
- **Only the likelier starts vote** (``KEEP_STARTS``): the medoid is chosen among the three
  quarters of the starts with the highest log-likelihood. The likelihood alone picks badly
  (its best start is often not the best partition), but a start in a poor local optimum
  should not decide between two partitions of near-equal support. On osmFISH the trim gave
  the same domains for two caller seeds on 14 of 20 embeddings instead of 12, and 1 of 40
  calls below 0.65 instead of 4; on DLPFC it changed nothing.
- **The Potts prior** (mean-field EM: each spot's class log-odds gain ``beta`` times the share
  of its neighbours in that class) re-estimates the mixture with the spatial context instead
  of overruling it afterwards as a majority vote does, so noisy single cells are pulled
  towards their neighbourhood's domain while clear spots keep their own.
- **More components than domains, joined where two views agree** (:func:`merge_components`),
  **kept where the caller's own model scores the join higher** (the default,
  ``n_components="auto"``). A spatially smoothed embedding turns a thick layer into a long,
  even stretch, and a K-component mixture cuts such stretches into slabs of one width: on
  DLPFC it splits L6 and L3 and gives the thin L2 and L4 no domain of their own. Fitted with
  2 K components and joined to K where the expression (``obsm["X_pca"]``) tells components
  apart least, the domains follow the layers there (DLPFC 0.579 -> 0.627 mean ARI, 10 seeds
  of 10 up), but on the osmFISH section that also joins two regions of one expression in
  different places (0.699 -> 0.639, 19 of 20 down). Joining only what the caller's input
  (the spatially smoothed embedding) also calls alike keeps those apart: over 30 seeds
  DLPFC 0.622 and osmFISH 0.682, against 0.578 and 0.691 with K components. Where the 2 K
  components do not follow the domains (tests/test_shard.py's noisy planted domains: one
  slice 0.67 -> 0.46) a component that mixes domains is joined whole into one of them, and
  the map gets patchier for little gain in expression. So the caller fits both and keeps
  the partition its own model scores higher: each spot's log-likelihood in ``X_pca`` under
  the EEE mixture fitted to the partition plus ``beta`` times its neighbours' share in its
  domain (:func:`partition_fits`, ``cluster.join_kept``). Neither signal alone will do:
  slabs of a straight gradient have straight edges, so the space alone keeps them
  (tests/test_cluster.py's ``smooth_layers``), and the expression alone lowers osmFISH;
  asking only for the sign of each (the check until 2026-12-07, night) kept joins that cut
  a large region along its own spread of expression where slices cover different parts of
  a tissue (benchmarks/README.md).

Cost is linear in spots: the starts are fitted on a seeded sample of at most ``fit_spots``,
the medoid is chosen on at most ``consensus_spots``, and the spatial EM is sparse (one pass
over the graph's edges per iteration). The starts dominate; their tied log-densities take one
product with the precision factor per EM step (:class:`TiedGaussianMixture`).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from sklearn.mixture import GaussianMixture

logger = logging.getLogger(__name__)

#: sklearn covariance type for each mclust model name
MCLUST_MODELS = {"EEE": "tied", "VVV": "full", "VVI": "diag", "VII": "spherical"}
#: default number of GMM starts of the caller (120 since 2026-12-06, 60 and 20 before:
#: benchmarks/README.md, "120 starts" and "What the 60 starts change")
N_STARTS = 120
#: share of the starts, by log-likelihood, among which the medoid is chosen (since
#: 2026-12-06, evening; 1.0 before: benchmarks/README.md, "Trimming the starts")
KEEP_STARTS = 0.75
#: mixture components before they are joined into the K domains. "auto" (the default since
#: 2026-12-07): fit K and 2 K, join the 2 K where both the model input and the caller's input
#: call them alike (:func:`merge_components`), and keep the partition the caller's own model
#: (the mixture in the model input and the Potts prior) scores higher (since 2026-12-07,
#: night; benchmarks/README.md, "The join kept where the caller's own model scores it
#: higher"); an integer M: M components, always joined; None: K, no merge.
N_COMPONENTS = "auto"


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


def tied_log_density(x: np.ndarray, means: np.ndarray, prec_chol: np.ndarray) -> np.ndarray:
    """``log N(x_i | mu_k, S)`` (spots x components) for one shared covariance
    ``S = (L L')^-1``, ``L = prec_chol``.

    With ``y = x L`` and ``m_k = mu_k L`` the squared Mahalanobis distance is
    ``|y - m_k|^2 = |y|^2 - 2 y.m_k + |m_k|^2``: one product with ``L`` and one with the
    means, where sklearn's tied model forms ``x L`` again for every component (that was
    70% of a start's time; benchmarks/README.md, "The starts' log-densities"). ``y`` and
    ``m`` are shifted by the means' centre first, so the expansion does not lose digits to a
    large common offset.
    """
    y = x @ prec_chol
    m = means @ prec_chol
    centre = m.mean(axis=0)
    y -= centre
    m = m - centre
    dist = np.einsum("ij,ij->i", y, y)[:, None] - 2.0 * (y @ m.T) + np.einsum("ij,ij->i", m, m)
    log_det = np.log(np.diag(prec_chol)).sum()
    return -0.5 * (x.shape[1] * np.log(2.0 * np.pi) + dist) + log_det


class TiedGaussianMixture(GaussianMixture):
    """sklearn's ``GaussianMixture`` (its EM, k-means start and convergence test)
    with the tied (EEE) log-densities of :func:`tied_log_density`; other covariance types are
    sklearn's own. It differs from sklearn's fit by rounding only: on the stored DLPFC and
    osmFISH embeddings the caller gave the same domains with either, 2-3x faster with this
    one (benchmarks/README.md, "The starts' log-densities")."""

    def _estimate_log_prob(self, X, xp=None):  # noqa: N803 (sklearn's name)
        if self.covariance_type != "tied":
            return super()._estimate_log_prob(X) if xp is None \
                else super()._estimate_log_prob(X, xp=xp)
        return tied_log_density(np.asarray(X), self.means_, self.precisions_cholesky_)


def fit_gmm(x: np.ndarray, k: int, model: str, seed: int, **init):
    """One Gaussian mixture fit (mclust-like settings; :class:`TiedGaussianMixture`)."""
    return TiedGaussianMixture(k, covariance_type=MCLUST_MODELS[model], random_state=seed,
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


def kept_starts(log_likelihoods, keep: float) -> np.ndarray:
    """Indices (ascending) of the ``ceil(keep * n)`` starts with the highest log-likelihood
    (at least one; ties broken by position, so the choice is deterministic)."""
    ll = np.asarray(log_likelihoods, dtype=np.float64)
    n_keep = max(1, int(np.ceil(keep * len(ll) - 1e-9)))
    return np.sort(np.argsort(-ll, kind="stable")[:n_keep])


def medoid_start(x: np.ndarray, groups: np.ndarray, k: int, *, model: str = "EEE",
                 n_starts: int = N_STARTS, seed: int = 0, fit_spots: int = 20_000,
                 consensus_spots: int = 3000, keep: float = KEEP_STARTS):
    """Fit ``n_starts`` seeded GMMs and return the typical good one, with the ARIs among all
    starts and the indices of the starts it was chosen among.

    The starts whose log-likelihood on the fit sample is among the highest ``keep`` share
    are kept; of those, the one whose partition agrees most with the other kept ones (sum of
    ARIs on a stratified sample) is returned. Without the trim a start stuck in a poor local
    optimum still votes, and where two partitions have near-equal support its vote decides
    (benchmarks/README.md, "Trimming the starts")."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep}: must be in (0, 1]")
    fit_idx = stratified_sample(groups, fit_spots, seed)
    fits = fit_starts(x[fit_idx], k, model, start_seeds(seed, n_starts))
    best, agree, kept = typical_start(fits, x, groups, k, seed=seed,
                                      consensus_spots=consensus_spots, keep=keep)
    return fits[best], agree, kept


def typical_start(fits: list, x: np.ndarray, groups: np.ndarray, k: int, *, seed: int = 0,
                  consensus_spots: int = 3000, keep: float = KEEP_STARTS):
    """The choice of :func:`medoid_start` among fitted ``fits``: the index of the one whose
    partition of a stratified sample of ``x`` agrees most with the other kept starts', the
    ARIs among all starts, and the kept starts' indices."""
    probe = x[stratified_sample(groups, consensus_spots, seed + 1)]
    agree = pairwise_ari(np.stack([g.predict(probe) for g in fits]), k)
    kept = kept_starts([g.lower_bound_ for g in fits], keep)
    return int(kept[np.argmax(agree[np.ix_(kept, kept)].sum(axis=1))]), agree, kept


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


def pooled_moments(sums: np.ndarray, gram: np.ndarray, nk: np.ndarray, n: int,
                   reg: float) -> tuple[np.ndarray, np.ndarray]:
    """Component means and the pooled within-component covariance of a soft partition, from
    ``sums`` (components x features, responsibility-weighted row sums), ``gram`` (X'X),
    ``nk`` (component weights) and ``n`` rows; a ridge of ``reg`` times the mean variance."""
    means = sums / nk[:, None]
    cov = (gram - (means.T * nk) @ means) / n
    cov += reg * np.trace(cov) / len(cov) * np.eye(len(cov))
    return means, cov


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Each row of ``logits`` turned into probabilities, in place (returns ``logits``).

    The same as ``exp(logits - logsumexp(logits, axis=1))`` up to rounding (scipy's carries
    about eps times the row maximum in the exponent; this one subtracts the maximum first), in
    a third of the time: at 10^6 spots and 7 components scipy's ``logsumexp`` took 0.33 s of
    the Potts EM's 0.75 s a step."""
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def potts_em(x: np.ndarray, share: sp.csr_matrix, resp: np.ndarray, beta: float, *,
             max_iter: int = 100, tol: float = 1e-4, reg: float = 1e-6
             ) -> tuple[np.ndarray, dict]:
    """Mean-field EM of an EEE Gaussian mixture under a Potts prior.

    E-step: ``log q_ik = log pi_k + log N(x_i | mu_k, S) + beta * (share @ q)_ik + c_i``;
    M-step: weighted means, one pooled covariance, mixing weights. ``share`` is the
    row-normalised neighbour graph, so ``beta`` is the largest log-odds a neighbourhood can
    add, whatever its size. Starts from ``resp`` (e.g. a fitted GMM's posteriors) and stops
    when no responsibility moves by more than ``tol`` in a step, or after ``max_iter`` steps.

    Returns the responsibilities and ``{"potts_iterations": steps taken, "potts_converged":
    whether the last step moved every responsibility by less than tol, "potts_change": the
    largest move of the last step, "potts_switched": how many spots changed their most
    likely component in the last step}``.
    """
    n, d = x.shape
    gram = x.T @ x
    q = resp
    change, steps, switched = np.inf, 0, 0
    for steps in range(1, max_iter + 1):
        nk = q.sum(axis=0) + 1e-12
        means, cov = pooled_moments(q.T @ x, gram, nk, n, reg)
        prec_means = np.linalg.solve(cov, means.T)  # (d, k)
        loglik = x @ prec_means - 0.5 * np.sum(means.T * prec_means, axis=0) + np.log(nk / n)
        logits = share @ q
        logits *= beta
        logits += loglik
        new = softmax_rows(logits)
        change = float(np.abs(new - q).max())
        if change < tol or steps == max_iter:
            switched = int(np.count_nonzero(new.argmax(axis=1) != q.argmax(axis=1)))
        q = new
        if change < tol:
            break
    return q, {"potts_iterations": steps, "potts_converged": bool(change < tol),
               "potts_change": change, "potts_switched": switched}


def merge_components(resp: np.ndarray, ref, k: int, *, fitted=None,
                     rows: np.ndarray | None = None, reg: float = 1e-3,
                     chunk: int = 100_000) -> np.ndarray:
    """Join a mixture's components into ``k`` groups by how distinct they are in ``ref``
    and, given ``fitted``, also in the view the mixture was fitted to.

    ``resp`` (spots x components) are the mixture's responsibilities and ``ref`` (spots x
    features) a second view of the same spots: the model input, ``obsm["X_pca"]``. In each
    view, each component gets its weighted mean, and the metric is the inverse of the pooled
    within-component covariance (ridge ``reg`` times its mean variance). Then, as in Ward's
    method, the pair whose union raises the within-group scatter least,
    ``w_a w_b / (w_a + w_b) * (m_a - m_b)' S^-1 (m_a - m_b)``, is joined until ``k`` remain.
    With ``fitted`` (spots x features, e.g. the caller's input) a pair's cost is the larger
    of its two costs, each divided by the median cost over all pairs of the components in
    its view: two components are joined only when both views call them alike.

    Why: the embedding is smoothed over space, so a thick layer becomes a long, even stretch
    of it, and a mixture tiles that stretch with components of one width. Fitted with more
    components than domains, the mixture cuts the stretch finer; the pieces of one layer
    have nearly the same expression and lie next to each other in the embedding, so both
    views call them alike. Two layers differ in expression; two regions of one expression in
    different places (osmFISH's "Layer 2-3 lateral" and "medial") differ in the spatially
    smoothed embedding. Read alone, the expression joins the latter too (benchmarks/
    README.md, "More components than domains").

    ``rows``: row ``i`` of ``resp`` is row ``rows[i]`` of ``ref`` and of ``fitted`` (read a
    chunk at a time, so a large view is never copied whole; dense or sparse). Returns an
    integer array mapping each component to its group, 0..k-1.
    """
    n, m = resp.shape
    if k >= m:
        return np.arange(m)
    resp = np.asarray(resp, dtype=np.float64)
    nk = resp.sum(axis=0) + 1e-12
    views = [_view_metric(resp, nk, v, rows, reg, chunk)
             for v in ([ref] if fitted is None else [ref, fitted])]
    weights = list(nk / n)
    # each view's costs on one scale (with one view a constant factor: the same joins)
    scales = [float(np.median([_ward_cost(weights[a], weights[b], means[a] - means[b], prec)
                               for a in range(m) for b in range(a + 1, m)])) or 1.0
              for means, prec in views]
    groups = [[c] for c in range(m)]
    centres = [list(means) for means, _ in views]
    while len(groups) > k:
        best, pair = np.inf, (0, 1)
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                cost = max(_ward_cost(weights[a], weights[b], c[a] - c[b], prec) / scale
                           for c, (_, prec), scale in zip(centres, views, scales))
                if cost < best:
                    best, pair = cost, (a, b)
        a, b = pair
        total = weights[a] + weights[b]
        for c in centres:
            c[a] = (weights[a] * c[a] + weights[b] * c[b]) / total
            del c[b]
        weights[a] = total
        groups[a] += groups[b]
        del groups[b], weights[b]
    mapping = np.empty(m, dtype=np.int64)
    for g, members in enumerate(groups):
        mapping[members] = g
    return mapping


def fisher_ratio(view, labels: np.ndarray, k: int, *, rows: np.ndarray | None = None,
                 chunk: int = 100_000) -> float:
    """How distinct a partition's ``k`` domains are in ``view`` (spots x features, e.g. the
    model input): Fisher's criterion trace(S_w^-1 S_b), the between-domain scatter in units
    of the pooled within-domain covariance (ridge 1e-6 of its mean variance), from the same
    moments as :func:`merge_components` reads. ``rows``: label ``i`` belongs to row
    ``rows[i]`` of ``view``, read ``chunk`` rows at a time."""
    return fisher_ratios(view, [labels], k, rows=rows, chunk=chunk)[0]


def fisher_ratios(view, partitions: list[np.ndarray], k: int, *,
                  rows: np.ndarray | None = None, chunk: int = 100_000) -> list[float]:
    """:func:`fisher_ratio` of each of several partitions, from one pass over ``view`` (the
    Gram matrix is the same for all)."""
    return [f for f, _ in partition_fits(view, partitions, k, rows=rows, chunk=chunk)]


def partition_fits(view, partitions: list[np.ndarray], k: int, *,
                   rows: np.ndarray | None = None,
                   chunk: int = 100_000) -> list[tuple[float, float]]:
    """How well each of several hard partitions (labels 0..k-1) of the same spots fits
    ``view`` (spots x features, e.g. the model input), from one pass over it: its Fisher
    ratio (:func:`fisher_ratio`) and its mean log-likelihood per spot under the Gaussian
    mixture of one shared covariance (mclust's EEE) fitted to it as it stands (the
    classification likelihood: each domain's share, mean and the pooled within-domain
    covariance, ridge 1e-6 of its mean variance). ``rows`` as in :func:`fisher_ratio`."""
    n = len(partitions[0])
    onehot = np.zeros((n, k * len(partitions)))
    for i, labels in enumerate(partitions):
        onehot[np.arange(n), i * k + labels] = 1.0
    sums, gram = _view_sums(onehot, view, rows, chunk)
    out = []
    for i in range(len(partitions)):
        part = slice(i * k, (i + 1) * k)
        nk = onehot[:, part].sum(axis=0) + 1e-12
        means, cov = pooled_moments(sums[part], gram, nk, n, 1e-6)
        within = (gram - (means.T * nk) @ means) / n  # the same, without the ridge
        prec = np.linalg.inv(cov)
        centred = means - (nk / n) @ means
        fisher = float(np.einsum("ki,ij,kj,k->", centred, prec, centred, nk / n))
        loglik = float(np.sum(nk / n * np.log(nk / n)) - 0.5 * (
            len(cov) * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
            + np.trace(prec @ within)))
        out.append((fisher, loglik))
    return out


def _ward_cost(w_a: float, w_b: float, diff: np.ndarray, prec: np.ndarray) -> float:
    """What joining two groups of weights ``w_a``, ``w_b`` and mean difference ``diff`` adds to
    the within-group scatter under the metric ``prec`` (Ward's criterion)."""
    return w_a * w_b / (w_a + w_b) * float(diff @ prec @ diff)


def _view_metric(resp: np.ndarray, nk: np.ndarray, view, rows: np.ndarray | None, reg: float,
                 chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The components' means in ``view`` and the inverse of its pooled within-component
    covariance."""
    sums, gram = _view_sums(resp, view, rows, chunk)
    means, cov = pooled_moments(sums, gram, nk, len(resp), reg)
    return means, np.linalg.inv(cov)


def _view_sums(resp: np.ndarray, view, rows: np.ndarray | None,
               chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``resp``-weighted row sums of ``view`` (components x features) and its Gram matrix,
    read ``chunk`` rows at a time in float64 (``view`` may be float32, sparse and large)."""
    n = len(resp)
    d = view.shape[1]
    sums = np.zeros((resp.shape[1], d))
    gram = np.zeros((d, d))
    for lo in range(0, n, chunk):
        block = view[lo:lo + chunk] if rows is None else view[rows[lo:lo + chunk]]
        block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
        sums += resp[lo:lo + chunk].T @ block
        gram += block.T @ block
    return sums, gram
