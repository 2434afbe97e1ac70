"""Embeddings to compare SpaMask against: plain PCA, PCA smoothed over space, and BANKSY."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .cluster import same_slice_neighbours
from .config import Keys
from .errors import DependencyError, InputError
from .utils import batch_codes, record, require_obsm


def smoothed_pca(adata: ad.AnnData, batch_key: str = Keys.BATCH, *, use_rep: str = Keys.PCA,
                 key_added: str = "X_pca_smoothed", hops: int = 2) -> None:
    """Average ``obsm[use_rep]`` over each spot and its same-slice spatial neighbours, ``hops``
    times (a random walk with self-loops on the spatial graph).

    Reads ``obsm[use_rep]`` and the spatial graph (``obsp["spamask_connectivities"]`` or a
    6-NN graph per slice). Writes ``obsm[key_added]``, ``uns["spamask"]["smoothed_pca"]``.
    """
    require_obsm(adata, use_rep)
    adj = same_slice_neighbours(adata, batch_key) + sp.identity(adata.n_obs, format="csr")
    walk = sp.diags(1.0 / np.asarray(adj.sum(axis=1)).ravel()) @ adj
    x = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    for _ in range(hops):
        x = walk @ x
    adata.obsm[key_added] = x.astype(np.float32)
    record(adata, "smoothed_pca", {"use_rep": use_rep, "hops": hops, "key_added": key_added})


def banksy(adata: ad.AnnData, batch_key: str = Keys.BATCH, *, lambda_: float = 0.2,
           k_geom: int = 15, max_m: int = 1, n_top_genes: int = 2000, n_pcs: int = 20,
           seed: int = 0, key_added: str = "X_banksy") -> None:
    """BANKSY (Singhal et al., Nat Genet 2024) computed with its own package, ``pybanksy``.

    Its recipe: log-normalised expression of ``n_top_genes`` HVGs (scanpy "seurat" flavour
    across slices); for each slice, the Gaussian-weighted mean over the ``k_geom`` nearest
    cells and the azimuthal Gabor filter of order ``max_m`` (the *centred* gradient, as the R
    package computes it: pybanksy 1.3.5's ``generate_banksy_matrix`` passes
    ``variance_balance`` into ``center`` and so leaves it uncentred, hence the keyword here);
    the three blocks z-scored within the slice and weighted by ``lambda_``; PCA to
    ``n_pcs`` over all slices (seeded). Harmony and clustering are left to the caller, as
    for every other method.

    Reads ``X`` (log-normalised by :func:`preprocess`), ``obsm["spatial"]``,
    ``obs[batch_key]``. Writes ``obsm[key_added]``, ``uns["spamask"]["banksy"]``.
    Needs the ``peers`` extra: ``pip install "spamask-integrate[peers]"``.
    """
    import contextlib
    import io

    try:
        from banksy.embed_banksy import create_nbr_matrix
        from banksy.main import concatenate_all, generate_spatial_weights_fixed_nbrs
    except ImportError as exc:
        raise DependencyError("BANKSY needs pybanksy: pip install 'spamask-integrate[peers]'"
                              ) from exc
    import scanpy as sc
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    if "log1p" not in adata.uns:
        raise InputError("banksy: X is not log-normalised; run preprocess() first")
    if not 0.0 <= lambda_ < 1.0:
        raise InputError(f"banksy: lambda_={lambda_} must be in [0, 1)")
    require_obsm(adata, Keys.SPATIAL)
    codes = batch_codes(adata, batch_key)
    genes = np.ones(adata.n_vars, dtype=bool)
    if adata.n_vars > n_top_genes:
        hvg = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes,
                                          batch_key=batch_key, inplace=False)
        genes = hvg["highly_variable"].to_numpy()
    x = adata.X[:, genes]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    blocks = np.empty((adata.n_obs, 3 * int(genes.sum()) if max_m else 2 * int(genes.sum())))
    decay = "scaled_gaussian"
    for code in np.unique(codes):
        idx = np.flatnonzero(codes == code)
        if idx.size <= k_geom * (max_m + 1):
            raise InputError(f"banksy: slice {adata.obs[batch_key].cat.categories[code]!r} "
                             f"has {idx.size} spots, not more than k_geom * (max_m + 1)")
        part = ad.AnnData(x[idx])
        with contextlib.redirect_stdout(io.StringIO()):  # pybanksy prints its progress
            nbrs = NearestNeighbors(algorithm="ball_tree").fit(xy[idx])
            weights = {m: generate_spatial_weights_fixed_nbrs(
                xy[idx], m=m, num_neighbours=k_geom, decay_type=decay, nbr_object=nbrs,
                verbose=False)[0] for m in range(max_m + 1)}
            nbr = create_nbr_matrix(part, {decay: {"weights": weights}}, decay, max_m,
                                    center=True, variance_balance=False, verbose=False)
            blocks[idx] = concatenate_all([part.X] + [nbr[m] for m in range(max_m + 1)],
                                          lambda_, None)
    n_pcs = min(n_pcs, blocks.shape[1] - 1, adata.n_obs - 1)
    adata.obsm[key_added] = PCA(n_pcs, random_state=seed).fit_transform(blocks).astype(
        np.float32)
    record(adata, "banksy", {"lambda": lambda_, "k_geom": k_geom, "max_m": max_m,
                             "n_genes": int(genes.sum()), "n_pcs": n_pcs, "seed": seed,
                             "agf_centred": True, "key_added": key_added})
