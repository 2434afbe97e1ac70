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
           k_geom: int | None = None, max_m: int | None = None, n_top_genes: int = 2000,
           n_pcs: int = 20, seed: int = 0, key_added: str = "X_banksy") -> None:
    """BANKSY (Singhal et al., Nat Genet 2024) computed with its own package, ``pybanksy``.

    The recipe of the package's authors: log-normalised expression of the union of each
    slice's top ``n_top_genes`` HVGs (seurat_v3 on the counts; all genes when there are no
    more); for each slice, the Gaussian-weighted mean over the ``k_geom`` nearest spots and,
    up to order ``max_m``, the azimuthal Gabor filter (the *centred* gradient, as the R
    package computes it: pybanksy 1.3.5's ``generate_banksy_matrix`` passes
    ``variance_balance`` into ``center`` and so leaves it uncentred, hence the keyword here);
    the blocks z-scored within the slice and weighted by ``lambda_``; PCA to ``n_pcs`` over
    all slices (seeded). Harmony and clustering are left to the caller, as for every other
    method.

    The neighbourhood follows the slice's layout, read from its coordinates
    (:func:`~spamask_integrate.graph.lattice_neighbours`), as the authors set it per
    platform: on a lattice of spots (Visium, in their multi-sample DLPFC analysis) the
    first-order neighbours (``k_geom`` 6 on a hexagonal grid) and no Gabor filter
    (``max_m`` 0); elsewhere (single cells, beads) the package defaults, ``k_geom`` 15 and
    ``max_m`` 1. Give ``k_geom`` or ``max_m`` to override.

    Reads ``X`` (log-normalised by :func:`preprocess`), ``layers["counts"]`` (for the HVGs),
    ``obsm["spatial"]``, ``obs[batch_key]``. Writes ``obsm[key_added]``,
    ``uns["spamask"]["banksy"]``.
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
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    from .graph import lattice_neighbours

    if "log1p" not in adata.uns:
        raise InputError("banksy: X is not log-normalised; run preprocess() first")
    if not 0.0 <= lambda_ < 1.0:
        raise InputError(f"banksy: lambda_={lambda_} must be in [0, 1)")
    if k_geom is not None and (int(k_geom) != k_geom or k_geom < 1):
        raise InputError(f"banksy: k_geom={k_geom} must be a positive integer")
    if max_m is not None and (int(max_m) != max_m or max_m < 0):
        raise InputError(f"banksy: max_m={max_m} must be a non-negative integer")
    require_obsm(adata, Keys.SPATIAL)
    codes = batch_codes(adata, batch_key)
    names = list(adata.obs[batch_key].cat.categories)
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2]
    members = {names[code]: np.flatnonzero(codes == code) for code in np.unique(codes)}
    settings = {}
    for name, idx in members.items():
        lattice = lattice_neighbours(xy[idx])
        k_s = int(k_geom) if k_geom is not None else (lattice or 15)
        m_s = int(max_m) if max_m is not None else (0 if lattice else 1)
        settings[name] = {"lattice": lattice, "k_geom": k_s, "max_m": m_s}
        if idx.size <= k_s * (m_s + 1):
            raise InputError(f"banksy: slice {name!r} has {idx.size} spots, not more "
                             f"than k_geom * (max_m + 1) = {k_s * (m_s + 1)}")
    grids = sorted(n for n, v in settings.items() if v["lattice"])
    if max_m is None and 0 < len(grids) < len(settings):  # the blocks would not line up
        other = next(n for n in settings if n not in grids)
        raise InputError(f"banksy: slice {grids[0]!r} is a grid of spots and slice {other!r} "
                         "is not, so their BANKSY blocks differ; give max_m (0 or 1) for all")
    genes = _banksy_genes(adata, codes, n_top_genes)  # after the cheap checks above
    x = adata.X[:, genes]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    decay = "scaled_gaussian"
    blocks = None
    for name, idx in members.items():
        k_s, m_s = settings[name]["k_geom"], settings[name]["max_m"]
        part = ad.AnnData(x[idx])
        with contextlib.redirect_stdout(io.StringIO()):  # pybanksy prints its progress
            nbrs = NearestNeighbors(algorithm="ball_tree").fit(xy[idx])
            weights = {m: generate_spatial_weights_fixed_nbrs(
                xy[idx], m=m, num_neighbours=k_s, decay_type=decay, nbr_object=nbrs,
                verbose=False)[0] for m in range(m_s + 1)}
            nbr = create_nbr_matrix(part, {decay: {"weights": weights}}, decay, m_s,
                                    center=True, variance_balance=False, verbose=False)
            block = concatenate_all([part.X] + [nbr[m] for m in range(m_s + 1)], lambda_, None)
        if blocks is None:
            blocks = np.empty((adata.n_obs, block.shape[1]))
        blocks[idx] = block
    n_pcs = min(n_pcs, blocks.shape[1] - 1, adata.n_obs - 1)
    adata.obsm[key_added] = PCA(n_pcs, random_state=seed).fit_transform(blocks).astype(
        np.float32)
    record(adata, "banksy", {"lambda": lambda_, "per_slice": settings,
                             "n_genes": int(genes.sum()), "n_pcs": n_pcs, "seed": seed,
                             "agf_centred": True, "key_added": key_added})


def _banksy_genes(adata: ad.AnnData, codes: np.ndarray, n_top_genes: int) -> np.ndarray:
    """The union of each slice's top ``n_top_genes`` seurat_v3 HVGs on the counts (all genes
    when there are no more): the gene set of BANKSY's multi-sample analysis."""
    import scanpy as sc

    if adata.n_vars <= n_top_genes:
        return np.ones(adata.n_vars, dtype=bool)
    if Keys.COUNTS not in adata.layers:
        raise InputError(f"banksy: no layers[{Keys.COUNTS!r}] with the raw counts for its "
                         "HVGs; run preprocess() first")
    genes = np.zeros(adata.n_vars, dtype=bool)
    for code in np.unique(codes):
        part = ad.AnnData(adata.layers[Keys.COUNTS][codes == code])
        hvg = sc.pp.highly_variable_genes(part, flavor="seurat_v3", n_top_genes=n_top_genes,
                                          inplace=False)
        genes |= hvg["highly_variable"].to_numpy()
    return genes


#: GraphST builds its graph and its contrastive readout as dense n x n matrices (up to five
#: float64 ones at once, 1 GB each at 11k spots): refuse sizes that would not fit in memory.
GRAPHST_MAX_SPOTS = 15_000


def graphst(adata: ad.AnnData, batch_key: str = Keys.BATCH, *, n_top_genes: int = 3000,
            epochs: int = 600, n_pcs: int = 20, seed: int = 0, device: str = "cpu",
            sparse_readout: bool = True, key_added: str = "X_graphst") -> None:
    """GraphST (Long et al., Nat Commun 2023) computed with its own package, ``GraphST``.

    Its recipe, from the counts: ``n_top_genes`` seurat_v3 HVGs over all spots, log of the
    counts per 10,000, scaled without centring (clipped at 10); a 3-nearest-neighbour graph;
    a one-layer graph autoencoder trained ``epochs`` epochs on feature reconstruction plus a
    contrastive loss against shuffled features; the reconstruction, L2-normalised, is its
    output, reduced to ``n_pcs`` principal components (seeded) as its own clustering does.
    Harmony and clustering are left to the caller, as for every other method.

    Three choices of ours, for time on a CPU:

    - the package's sparse mode (its ``datatype="Slide"``), for every platform: its dense
      mode for Visium multiplies an n x n matrix with the n x 3,000 reconstruction every
      epoch, hours on two cores at 11k spots. The two modes differ a little: the sparse one
      normalises the graph with its self-loops (the dense one adds them after) and
      L2-normalises the output;
    - with ``sparse_readout`` (the default), the contrastive readout, each spot's mean
      embedding over its graph neighbourhood, multiplies a sparse copy of the package's
      n x n neighbourhood matrix instead of the dense one (the same sums: the same embedding,
      bit for bit on the development machine; an epoch on the four DLPFC slices 1.3 s
      instead of 1.7 s). It
      stands in for the package's readout class while the package trains;
    - each slice's coordinates are moved apart before the package builds its one graph,
      so no neighbour crosses a slice.

    The package builds dense n x n matrices all the same, so more than
    :data:`GRAPHST_MAX_SPOTS` spots raise.

    Reads ``layers["counts"]`` (or ``X``, raw counts), ``obsm["spatial"]``,
    ``obs[batch_key]``. Writes ``obsm[key_added]``, ``uns["spamask"]["graphst"]``. Needs the
    ``peers`` extra: ``pip install "spamask-integrate[peers]"``. What the package sets
    globally (the random states of Python, numpy and torch, cuDNN's flags and two
    environment variables) is restored afterwards.
    """
    import contextlib
    import io
    import os
    import random

    import torch
    from sklearn.decomposition import PCA

    from .train import resolve_device

    if adata.n_obs > GRAPHST_MAX_SPOTS:
        raise InputError(f"graphst: {adata.n_obs} spots; GraphST holds dense n x n matrices, "
                         f"so this peer runs on at most {GRAPHST_MAX_SPOTS} spots")
    if epochs < 1 or n_top_genes < 1:
        raise InputError(f"graphst: epochs={epochs} and n_top_genes={n_top_genes} must be "
                         "positive")
    require_obsm(adata, Keys.SPATIAL)
    codes = batch_codes(adata, batch_key)
    counts = adata.layers[Keys.COUNTS] if Keys.COUNTS in adata.layers else adata.X
    counts = sp.csr_matrix(counts, dtype=np.float32)
    if counts.nnz and (counts.data.min() < 0 or not np.allclose(counts.data,
                                                                 np.round(counts.data))):
        raise InputError("graphst: needs raw counts in layers['counts'] or X")
    xy = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)[:, :2].copy()
    span = float(np.ptp(xy, axis=0).max()) if adata.n_obs else 0.0
    xy[:, 0] += codes * 10.0 * (span + 1.0)  # slices side by side, far apart
    part = ad.AnnData(counts, obsm={"spatial": xy})
    part.var_names = adata.var_names.copy()
    n_genes = min(n_top_genes, adata.n_vars)
    # saved before the import: importing the package already reseeds numpy
    np_state, py_state = np.random.get_state(), random.getstate()
    env = {k: os.environ.get(k) for k in ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")}
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        try:
            from GraphST.GraphST import GraphST
        except ImportError as exc:
            raise DependencyError("GraphST needs the GraphST package: "
                                  "pip install 'spamask-integrate[peers]'") from exc
        from GraphST import model as graphst_module

        dense_readout = graphst_module.AvgReadout
        with torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()):
            model = GraphST(part, device=resolve_device(device), epochs=epochs,
                            dim_input=n_genes, random_seed=seed, datatype="Slide")
            if sparse_readout:
                model.graph_neigh = model.graph_neigh.to_sparse()
                graphst_module.AvgReadout = _sparse_readout
            try:
                out = model.train().obsm["emb"]
            finally:
                graphst_module.AvgReadout = dense_readout
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = np.asarray(out, dtype=np.float64)
    n_pcs = min(n_pcs, out.shape[1] - 1, adata.n_obs - 1)
    adata.obsm[key_added] = PCA(n_pcs, random_state=seed).fit_transform(out).astype(np.float32)
    record(adata, "graphst", {"n_top_genes": n_genes, "epochs": epochs, "n_pcs": n_pcs,
                              "seed": seed, "mode": "sparse (datatype='Slide')",
                              "key_added": key_added})


def _sparse_readout():
    """GraphST's ``AvgReadout`` module (each spot's mean embedding over its neighbourhood, L2
    normalised) for a sparse neighbourhood matrix; the package builds its module by calling
    ``AvgReadout()``, so this stands in for the class while it trains."""
    import torch

    class SparseReadout(torch.nn.Module):
        def forward(self, emb, mask):
            total = torch.sparse.mm(mask, emb)
            count = torch.sparse.sum(mask, 1).to_dense()
            return torch.nn.functional.normalize(total / count[:, None], p=2, dim=1)

    return SparseReadout()
