"""Joint preprocessing of many slices: gene filter, HVGs across batches, normalisation, PCA.

The scaled matrix is never materialised: z-scoring (per slice or joint) is folded into a
randomized PCA on the sparse normalised counts, so memory stays O(nnz + n_spots x n_comps).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from .config import Keys
from .errors import ConfigError, InputError
from .utils import blas_threads, record, require_obs

if TYPE_CHECKING:
    from .shard import Collective

logger = logging.getLogger(__name__)

#: ``X`` after preprocessing is log1p(counts per this many), scanpy's and Seurat's convention,
#: so that scanpy's downstream tools (rank_genes_groups, plotting by gene) read it as they expect
X_TARGET_SUM = 1e4

#: up to this many genes PCA is exact (eigen-decomposition of the gene x gene Gram matrix,
#: built in chunks of spots); above it a seeded randomized SVD is used
_GRAM_MAX_GENES = 6000
#: seurat_v3's loess of fewer varying genes than this ends the process (skmisc 0.5: a
#: segmentation fault with 0-3 points; 4-12 points raise an error, as a fit can)
_LOESS_MIN_GENES = 4


def preprocess(
    adata: ad.AnnData,
    batch_key: str = Keys.BATCH,
    n_top_genes: int | None = 5000,
    n_comps: int | None = 200,
    *,
    min_cells: int = 50,
    min_counts: int = 10,
    target_sum: float = 1e6,
    log1p: bool = False,
    scale: bool = True,
    scale_per_batch: bool = True,
    seed: int = 42,
    key_added: str = Keys.PCA,
    copy: bool = False,
    comm: Collective | None = None,
) -> ad.AnnData | None:
    """Select HVGs across slices, normalise and compute the model input.

    The model input follows the reference SpaMask "pca" mode (``spamask_reference.md``
    section 1): genes in fewer than ``min_cells`` spots or with fewer than ``min_counts`` counts
    are dropped; ``seurat_v3`` HVGs on raw counts with ``batch_key`` as batch; CPM without log;
    per-slice z-scoring; PCA-200 fitted jointly on all slices. ``X`` itself is left as scanpy
    expects it for downstream analysis: log1p of counts per 10,000 (all kept genes), with
    ``uns["log1p"]`` set as ``sc.pp.log1p`` would.

    Parameters
    ----------
    n_top_genes
        HVGs to keep (all genes when ``None`` or larger than the gene count).
    n_comps
        PCA dimensions; ``None`` puts the sparse normalised HVG matrix in ``obsm["X_hvg"]``.
    scale_per_batch
        z-score each slice on its own (as the reference) instead of all spots together.
    comm
        In a slice-sharded run (:mod:`spamask_integrate.shard`), the ranks' collective: this
        process holds only some slices (``obs[batch_key]`` keeps every slice as a category) and
        the gene counts, per-slice HVG variances, z-score sums and the Gram matrix are summed
        across ranks, so every rank gets the genes and components a single process would.

    Reads ``X`` or ``layers["counts"]`` (raw counts), ``obs[batch_key]``.
    Writes ``layers["counts"]``, ``X`` (log1p of counts per 10,000), ``uns["log1p"]``,
    ``var["highly_variable"]``, ``obsm[key_added]`` (or ``obsm["X_hvg"]``),
    ``uns["spamask"]["preprocess"]``.
    """
    require_obs(adata, batch_key)
    if n_comps is not None and n_comps < 1:
        raise ConfigError(f"n_comps={n_comps}: must be a positive integer or None")
    if n_top_genes is not None and n_top_genes < 1:
        raise ConfigError(f"n_top_genes={n_top_genes}: must be a positive integer or None")
    adata = adata.copy() if copy else adata
    counts = adata.layers[Keys.COUNTS] if Keys.COUNTS in adata.layers else adata.X
    counts = sp.csr_matrix(counts, dtype=np.float32)
    # sorted, without duplicate entries (in place: the same counts, no copy of the matrix)
    counts.sum_duplicates()
    keep = _gene_filter(counts, min_cells, min_counts, comm)
    if keep.sum() == 0:
        raise InputError(f"no gene passes min_cells={min_cells} and min_counts={min_counts}; "
                         "lower them")
    # X is rebuilt from the counts below: dropping the old one first keeps one copy of the
    # counts in memory instead of two (the peak of a large or sharded run)
    adata.X = None
    with _counts_in_x_on_failure(adata):  # a slice seurat_v3 cannot fit, say
        adata.layers[Keys.COUNTS] = counts
        if keep.sum() < adata.n_vars:
            logger.info("gene filter: %d of %d genes kept", keep.sum(), adata.n_vars)
            adata._inplace_subset_var(keep)
        counts = adata.layers[Keys.COUNTS]
        hvg = _select_hvgs(adata, batch_key, n_top_genes, comm)
        totals = _totals(counts)
        params = {
            "batch_key": batch_key, "n_top_genes": int(hvg.sum()), "min_cells": min_cells,
            "min_counts": min_counts, "target_sum": float(target_sum), "log1p": bool(log1p),
            "scale": bool(scale), "scale_per_batch": bool(scale_per_batch), "seed": seed,
            "X": f"log1p(counts per {X_TARGET_SUM:g})",
        }
        params.update(_model_input(adata, counts, totals, hvg, batch_key, n_comps,
                                   target_sum=target_sum, log1p=log1p, scale=scale,
                                   scale_per_batch=scale_per_batch, seed=seed,
                                   key_added=key_added, comm=comm))
        # after the model input's own matrix is freed: the two never coexist (one copy less)
        adata.X = _normalise(counts, totals, X_TARGET_SUM, True)
    adata.uns["log1p"] = {}  # natural log, as sc.pp.log1p records it (no "base")
    record(adata, "preprocess", params)
    logger.info("preprocess: %d spots, %d HVGs -> obsm[%r]", adata.n_obs, hvg.sum(),
                params["input_key"])
    return adata if copy else None


@contextmanager
def _counts_in_x_on_failure(adata: ad.AnnData):
    """Should a step inside fail after ``X`` was dropped, leave the counts in ``X`` again, as
    they came, rather than an AnnData without ``X``."""
    try:
        yield
    except BaseException:
        if adata.X is None:
            adata.X = adata.layers[Keys.COUNTS].copy()
        raise


def _model_input(adata: ad.AnnData, counts: sp.csr_matrix, totals: np.ndarray,
                 hvg: np.ndarray, batch_key: str, n_comps: int | None, *, target_sum: float,
                 log1p: bool, scale: bool, scale_per_batch: bool, seed: int, key_added: str,
                 comm: Collective | None) -> dict:
    """The normalised HVGs, z-scored into a PCA (``obsm[key_added]``) or kept sparse
    (``obsm["X_hvg"]`` when ``n_comps`` is None); returns the parameters to record."""
    xh = _normalise(counts if hvg.all() else counts[:, hvg].tocsr(), totals, target_sum,
                    log1p)  # (no column copy when every gene is kept)
    if n_comps is None:
        adata.obsm["X_hvg"] = xh.astype(np.float32)
        return {"n_comps": 0, "input_key": "X_hvg"}
    n_comps = min(n_comps, xh.shape[1] - 1, _total(comm, adata.n_obs) - 1)
    codes = adata.obs[batch_key].cat.codes.to_numpy() if scale_per_batch else None
    n_groups = len(adata.obs[batch_key].cat.categories) if scale_per_batch else 1
    scores, var_ratio = _scaled_pca(xh, codes, n_comps, scale=scale, seed=seed,
                                    n_groups=n_groups, comm=comm)
    adata.obsm[key_added] = scores
    adata.uns.setdefault("pca", {})["variance_ratio"] = var_ratio
    return {"n_comps": int(n_comps), "input_key": key_added}


def _sum(comm: Collective | None, a: np.ndarray) -> np.ndarray:
    """``a`` summed over the ranks of a sharded run (``a`` itself in one process)."""
    return np.asarray(a) if comm is None else comm.sum(a)


def _total(comm: Collective | None, value: int) -> int:
    return int(value) if comm is None else int(comm.sum(np.asarray([value]))[0])


def _gene_filter(counts: sp.csr_matrix, min_cells: int, min_counts: int,
                 comm: Collective | None = None) -> np.ndarray:
    """Genes in at least ``min_cells`` spots with at least ``min_counts`` counts (``counts``
    in canonical form, as preprocess leaves them: a duplicate entry would count twice)."""
    totals, _, n_cells = _column_moments(counts)
    n_cells, totals = _sum(comm, n_cells), _sum(comm, totals)
    return (n_cells >= min_cells) & (totals >= min_counts)


def _select_hvgs(adata: ad.AnnData, batch_key: str, n_top_genes: int | None,
                 comm: Collective | None = None) -> np.ndarray:
    """seurat_v3 HVGs with the slices as batches, as ``sc.pp.highly_variable_genes`` chooses them.

    scanpy's batch mode fits each batch on its own (means, variances, the loess of log variance
    on log mean, clipped standardised variances) and then ranks genes by their median rank over
    the batches, ties broken by the number of batches in which a gene is highly variable. Here
    the per-slice statistics of all slices come from passes over the counts as a whole
    (:func:`_seurat_v3_norm_vars`, the same sums in the same order as scanpy's), and the ranks
    are combined the same way, so that a sharded run, whose ranks hold different slices,
    combines the per-slice variances (summed across ranks) into the same genes.
    ``tests/test_shard.py`` checks the equality with scanpy.
    """
    if n_top_genes is None or n_top_genes >= adata.n_vars:
        adata.var["highly_variable"] = True
        return np.ones(adata.n_vars, dtype=bool)
    names = list(adata.obs[batch_key].cat.categories)
    codes = adata.obs[batch_key].cat.codes.to_numpy().astype(np.int64)
    counts = adata.layers[Keys.COUNTS]
    data = counts.data
    if data.size and not np.array_equal(data, np.round(data)):
        logger.warning("seurat_v3 HVGs expect raw counts; layers[%r] holds non-integers",
                       Keys.COUNTS)
    group_total, group_sq, _ = _group_moments(counts, codes, len(names))
    norm = _seurat_v3_norm_vars(counts, codes, names, batch_key, group_total)
    present = (np.bincount(codes, minlength=len(names)) > 0).astype(np.float64)
    norm, present = _sum(comm, norm), _sum(comm, present)
    norm = norm[present > 0]
    ranks = np.argsort(np.argsort(-norm, axis=1), axis=1).astype(np.float32)
    n_batches = (ranks < n_top_genes).sum(axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    n = _total(comm, adata.n_obs)
    total, sq = (_sum(comm, a.sum(axis=0)) for a in (group_total, group_sq))
    mean = total / n
    df = pd.DataFrame({"means": mean, "variances": (sq - n * mean**2) / max(n - 1, 1),
                       "highly_variable_rank": median, "highly_variable_nbatches": n_batches,
                       "variances_norm": norm.mean(axis=0)}, index=adata.var_names)
    order = df.sort_values(["highly_variable_rank", "highly_variable_nbatches"],
                           ascending=[True, False], na_position="last").index
    df["highly_variable"] = False
    df.loc[order[:int(n_top_genes)], "highly_variable"] = True
    for column in df.columns:
        adata.var[column] = df[column].to_numpy()
    adata.uns["hvg"] = {"flavor": "seurat_v3"}
    return df["highly_variable"].to_numpy(dtype=bool)


def _seurat_v3_norm_vars(counts: sp.csr_matrix, codes: np.ndarray, names: list[str],
                         batch_key: str, total: np.ndarray, span: float = 0.3,
                         chunk: int = 1 << 22) -> np.ndarray:
    """seurat_v3's standardised variance of every gene in every slice (slices x genes; rows
    of slices without spots stay 0).

    ``total``: the counts summed per slice and gene (:func:`_group_moments`). Per slice: mean
    and variance of the counts (ddof 1), a loess (degree 2) of log10 variance
    on log10 mean over the genes that vary, counts clipped at mean + sqrt(n) * fitted sd,
    and the variance of the clipped counts over the fitted one. The sums run as scanpy's do:
    squares of float32 counts in float32, clipped values in float64, in the order of the CSR
    entries (``np.bincount`` adds its weights in input order), for all slices at once over
    blocks of about ``chunk`` stored entries. Within one block the statistics equal those of
    scanpy's per-slice call bit for bit; across blocks the clipped sums are added block by
    block, which can move their last bit. No slice is copied out and none of scanpy's numba
    kernels is compiled (3-4 s in a first run on the four DLPFC slices).
    """
    from skmisc.loess import loess

    n_groups, g = len(names), counts.shape[1]
    sizes = np.bincount(codes, minlength=n_groups)
    blocks = list(_row_blocks(counts, chunk))
    sq = np.zeros(n_groups * g)  # squares in float32, as scanpy takes them
    for lo, hi, a, b in blocks:
        values = counts.data[a:b]
        sq += np.bincount(_flat_bins(counts, codes, lo, hi),
                          weights=(values * values).astype(np.float64), minlength=sq.size)
    sq = sq.reshape(n_groups, g)
    means, reg_std = np.zeros((n_groups, g)), np.ones((n_groups, g))
    for code in np.flatnonzero(sizes):
        n = int(sizes[code])
        mean = total[code] / n
        var = sq[code] / n - mean**2
        if n != 1:
            var *= n / (n - 1)
        not_const = var > 0
        if not_const.sum() < _LOESS_MIN_GENES:  # skmisc's loess crashes the process there
            raise InputError(f"seurat_v3 HVG selection failed on slice {names[code]!r} of "
                             f"obs[{batch_key!r}]: only {int(not_const.sum())} genes vary in "
                             "it; drop the slice, or keep every gene (preprocess "
                             "n_top_genes=None, in a run config n_top_genes: null)")
        fitted = np.zeros(g)
        try:
            model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span,
                          degree=2)
            model.fit()
        except Exception as exc:  # skmisc's loess fails on degenerate slices
            raise InputError(f"seurat_v3 HVG selection failed on slice {names[code]!r} of "
                             f"obs[{batch_key!r}]: {exc}") from exc
        fitted[not_const] = model.outputs.fitted_values
        means[code], reg_std[code] = mean, np.sqrt(10**fitted)
    clip = (reg_std * np.sqrt(sizes)[:, None] + means).ravel()
    clipped_sq, clipped_sum = np.zeros(n_groups * g), np.zeros(n_groups * g)
    for lo, hi, a, b in blocks:
        flat = _flat_bins(counts, codes, lo, hi)
        clipped = np.minimum(counts.data[a:b].astype(np.float64), clip[flat])
        clipped_sq += np.bincount(flat, weights=clipped**2, minlength=clip.size)
        clipped_sum += np.bincount(flat, weights=clipped, minlength=clip.size)
    clipped_sq, clipped_sum = clipped_sq.reshape(n_groups, g), clipped_sum.reshape(n_groups, g)
    norm = np.zeros((n_groups, g))
    for code in np.flatnonzero(sizes):
        n, mean = int(sizes[code]), means[code]
        with np.errstate(divide="ignore", invalid="ignore"):  # a one-spot slice, as scanpy
            norm[code] = (1 / ((n - 1) * np.square(reg_std[code]))) * (
                (n * np.square(mean)) + clipped_sq[code] - 2 * clipped_sum[code] * mean)
    return norm


def _column_moments(x: sp.csr_matrix, chunk: int = 1 << 22) -> tuple[np.ndarray, ...]:
    """Column sums, sums of squares and non-zero counts (float64) of a CSR matrix."""
    return tuple(m[0] for m in _group_moments(x, None, 1, chunk))


def _group_moments(x: sp.csr_matrix, codes: np.ndarray | None, n_groups: int,
                   chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of rows (``codes``; one group when None): column sums, sums of squares and
    non-zero counts of ``x`` (float64, n_groups x genes). Read from blocks of whole rows
    holding about ``chunk`` stored entries: the memory beyond ``x`` is a few arrays of that
    length (about 100 MB at the default), whatever the size of ``x``."""
    g = x.shape[1]
    out = np.zeros((3, n_groups * g))
    for lo, hi, a, b in _row_blocks(x, chunk):
        values = x.data[a:b].astype(np.float64)
        flat = _flat_bins(x, codes, lo, hi)
        out[0] += np.bincount(flat, weights=values, minlength=n_groups * g)
        out[1] += np.bincount(flat, weights=values * values, minlength=n_groups * g)
        out[2] += np.bincount(flat[values != 0], minlength=n_groups * g)
    return tuple(m.reshape(n_groups, g) for m in out)


def _row_blocks(x: sp.csr_matrix, chunk: int):
    """(lo, hi, a, b): blocks of whole rows lo:hi of ``x`` holding about ``chunk`` stored
    entries, which are ``x.data[a:b]``."""
    ptr = x.indptr
    bounds = np.unique(np.r_[np.searchsorted(ptr, np.arange(0, x.nnz, chunk), "right") - 1,
                             x.shape[0]])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield int(lo), int(hi), int(ptr[lo]), int(ptr[hi])


def _flat_bins(x: sp.csr_matrix, codes: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """The bin (group * genes + gene) of each stored entry of rows lo:hi (the gene alone
    without ``codes``)."""
    ptr = x.indptr
    cols = x.indices[ptr[lo]:ptr[hi]]
    if codes is None:
        return cols
    return np.repeat(codes[lo:hi] * x.shape[1], np.diff(ptr[lo:hi + 1])) + cols


def _totals(counts: sp.csr_matrix) -> np.ndarray:
    """Counts per spot over all kept genes (1 for an empty spot, so it stays all zero)."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    return totals


def _normalise(counts: sp.csr_matrix, totals: np.ndarray, target_sum: float,
               log1p: bool) -> sp.csr_matrix:
    x = sp.csr_matrix(sp.diags((target_sum / totals).astype(np.float32)) @ counts)
    if log1p:
        np.log1p(x.data, out=x.data)
    return x


def _scaled_pca(x: sp.csr_matrix, codes: np.ndarray | None, n_comps: int, *, scale: bool,
                seed: int, n_oversamples: int = 20, n_iter: int = 6, chunk: int = 20_000,
                n_groups: int | None = None,
                comm: Collective | None = None) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the z-scored ``x`` (per group of ``codes``) without forming the dense matrix.

    z = x * inv_sd[group] - mean[group] * inv_sd[group]. Up to ``_GRAM_MAX_GENES`` genes the
    Gram matrix z.T z is accumulated over chunks of ``chunk`` spots and eigen-decomposed
    (products and sums in float64); above, the operator is applied implicitly in a seeded
    randomized SVD (Halko et al.). Memory beyond ``x`` stays at a few dense chunks (chunk x genes) and, above
    ``_GRAM_MAX_GENES`` genes, one float64 copy of ``x``: nothing grows with the non-zeros
    times a 64-bit index.

    With ``comm`` (a sharded run) the group sums and the Gram matrix are summed across ranks
    and the eigenvectors taken from rank 0, so each rank projects its own spots onto the
    components of all spots; the randomized path is single-process only.
    """
    n, g = x.shape
    codes = np.zeros(n, dtype=np.int64) if codes is None else np.asarray(codes, dtype=np.int64)
    n_groups = n_groups or (int(codes.max()) + 1 if n else 1)
    ind = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_groups))
    sizes = _sum(comm, np.asarray(ind.sum(axis=0)).ravel())
    sizes[sizes == 0] = 1
    total, sq, _ = _group_moments(x, codes, n_groups)
    total, sq = _sum(comm, total), _sum(comm, sq)
    mean = total / sizes[:, None]
    var = np.maximum(sq / sizes[:, None] - mean**2, 0) * (sizes / np.maximum(sizes - 1, 1))[:, None]
    inv_sd = np.ones_like(var)
    if scale:
        sd = np.sqrt(var)
        inv_sd = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1), 1.0)
    shift = mean * inv_sd  # (n_groups, g)

    def scaled(lo: int, hi: int) -> sp.csr_matrix:  # rows lo:hi of x * inv_sd[group]
        part = x[lo:hi].astype(np.float64)
        rows = np.repeat(codes[lo:hi], np.diff(part.indptr))
        part.data *= inv_sd[rows, part.indices]
        return part

    if g <= _GRAM_MAX_GENES:
        return _gram_pca(scaled, n, g, ind, shift, n_comps, chunk, comm)
    if comm is not None:
        raise ConfigError(f"{g} HVGs: a sharded run computes the exact PCA, up to "
                          f"{_GRAM_MAX_GENES} genes; lower n_top_genes")
    xs = sp.vstack([scaled(lo, lo + chunk) for lo in range(0, n, chunk)], format="csr")

    def matmul(m: np.ndarray) -> np.ndarray:  # z @ m
        return xs @ m - ind @ (shift @ m)

    def rmatmul(m: np.ndarray) -> np.ndarray:  # z.T @ m
        return xs.T @ m - shift.T @ (ind.T @ m)

    rng = np.random.default_rng(seed)
    k = min(n_comps + n_oversamples, g, n)
    q, _ = np.linalg.qr(matmul(rng.standard_normal((g, k))))
    for _ in range(n_iter):
        q, _ = np.linalg.qr(rmatmul(q))
        q, _ = np.linalg.qr(matmul(q))
    b = rmatmul(q).T  # (k, g)
    u_b, s, _ = np.linalg.svd(b, full_matrices=False)
    u = q @ u_b[:, :n_comps]
    s = s[:n_comps]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(n_comps)])
    signs[signs == 0] = 1
    scores = (u * s * signs).astype(np.float32)
    total_var = _total_variance(xs, ind, shift)
    return scores, (s**2 / max(total_var, 1e-12)).astype(np.float64)


def _gram_pca(scaled, n: int, g: int, ind: sp.csr_matrix, shift: np.ndarray,
              n_comps: int, chunk: int,
              comm: Collective | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact PCA of the implicit z matrix through its g x g Gram matrix, built chunk-wise
    (``scaled(lo, hi)`` gives the scaled sparse rows lo:hi)."""
    gram = np.zeros((g, g))
    # dense blocks of at most ~2^22 entries (32 MB in float64) whatever the gene count: a
    # fixed 20,000-row block was 0.6 GB of temporaries at 2,000 genes, the largest part of a
    # small shard's peak memory
    rows = max(256, min(chunk, (1 << 22) // max(g, 1)))
    # each block's product is written into this one buffer (beta = 0: overwritten, not added
    # to) and then added to the sum, so the sum is the same, bit for bit, as adding a fresh
    # product per block; a fresh g x g result per block cost as much as the product itself
    # (page faults on 200 MB at 5,000 genes: 7.3 s against 4.0 s for the 14 blocks of the
    # four DLPFC slices). Accumulating inside the update (beta = 1) would be as fast but
    # rounds differently, which moves the components in their last bits.
    block = np.zeros((g, g), order="F")
    for lo in range(0, n, rows):
        # each block's product in float64 through scipy's BLAS (a symmetric rank-k update, half
        # the products: the upper triangle of the Fortran-ordered block, which is the lower
        # triangle of its C-ordered transpose; the other half is filled in at the end).
        # numpy's `z.T @ z` in float32 was slower and less exact: numpy<2's bundled OpenBLAS
        # 0.3.23 does not recognise recent Intel CPUs (Sapphire Rapids) and runs its oldest
        # kernels (per 1,398 x 3,000 block on the 2-core machine: 0.46 s, against 0.19 s for
        # this float64 update), and float32 rounding made a sharded run's trailing components
        # differ from one process's by 1e-4
        z = scaled(lo, lo + rows).toarray() - ind[lo:lo + rows] @ shift
        block = scipy.linalg.blas.dsyrk(1.0, z.T, beta=0.0, c=block, trans=0, overwrite_c=1)
        gram += block.T  # both C-contiguous: a plain element-wise sum
    del block
    gram += np.tril(gram, -1).T  # the upper triangle is still zero: one g x g temporary
    gram = _sum(comm, gram)
    # only the top n_comps eigenpairs (LAPACK's MRRR driver on the subset): the full
    # decomposition of a 5,000 x 5,000 Gram matrix costs several times as much
    values, vectors = scipy.linalg.eigh(gram, subset_by_index=[g - n_comps, g - 1],
                                        driver="evr", check_finite=False)
    if comm is not None:  # one set of components for every rank, whatever its LAPACK does
        values, vectors = comm.broadcast(values), comm.broadcast(vectors)
    order = np.argsort(values)[::-1]
    vectors = vectors[:, order]
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(n_comps)])
    signs[signs == 0] = 1
    vectors = vectors * signs
    scores = np.empty((n, n_comps), dtype=np.float32)
    shifted = shift @ vectors
    workers = min(blas_threads(), max(1, -(-n // 1000)))
    step = max(1, min(chunk, -(-n // workers)))

    def project(lo: int) -> None:  # rows lo:lo + step; each row on its own, so the split
        # into blocks and threads does not change a bit of the scores
        scores[lo:lo + step] = scaled(lo, lo + step) @ vectors - ind[lo:lo + step] @ shifted

    # scipy's sparse product runs on one core and lets go of the GIL: blocks side by side
    # (1.4 s -> 0.9 s for the four DLPFC slices on 2 cores)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(project, range(0, n, step)))
    total = max(float(np.trace(gram)), 1e-12)
    return scores, np.maximum(values[order], 0) / total


def _total_variance(xs: sp.csr_matrix, ind: sp.csr_matrix, shift: np.ndarray) -> float:
    """Squared Frobenius norm of the implicit z matrix."""
    cross = (ind.T @ xs).toarray()  # sum of xs rows per group
    sizes = np.asarray(ind.sum(axis=0)).ravel()
    return float(xs.multiply(xs).sum() - 2 * (cross * shift).sum() + (sizes[:, None] * shift**2).sum())
