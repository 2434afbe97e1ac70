"""Baseline embeddings to compare SpaMask against: plain PCA and PCA smoothed over space."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from .cluster import same_slice_neighbours
from .config import Keys
from .utils import record, require_obsm


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
