"""The spatial neighbour graph: one kNN or radius graph per slice, joined block-diagonally.

Each slice's graph is built on its own coordinates with a KD-tree (never an n x n matrix),
made symmetric, given self-loops (``GraphConv`` needs every node to have an in-edge) and joined
with ``dgl.batch``. No edge joins two slices unless the caller passes ``extra_edges``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Union

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.neighbors import KDTree

from .config import Keys
from .errors import ConfigError, InputError
from .utils import batch_codes, record, require_obsm

logger = logging.getLogger(__name__)

#: neighbours per spot when the platform is known: Visium's hexagonal grid has 6 nearest
#: neighbours, ST's square grid 4; single-cell and bead platforms use a plain kNN.
PLATFORM_K = {"visium": 6, "st": 4, "slide-seq": 12, "stereo-seq": 12, "merfish": 12,
              "osmfish": 12, "xenium": 12, "cosmx": 12, "imaging": 12}
DEFAULT_K = 12

ExtraEdges = Union[Callable[[ad.AnnData], tuple[np.ndarray, np.ndarray]],
                   tuple[np.ndarray, np.ndarray], None]


def build_graph(
    adata: ad.AnnData,
    batch_key: str = Keys.BATCH,
    method: str = "knn",
    k: int | None = None,
    radius: float | None = None,
    *,
    platform: str | None = None,
    spatial_key: str = Keys.SPATIAL,
    extra_edges: ExtraEdges = None,
    key_added: str = Keys.CONNECTIVITIES,
):
    """Build the block-diagonal spatial graph over all spots, in AnnData order.

    Parameters
    ----------
    method
        ``"knn"``: each spot joined to its ``k`` nearest spots in its slice; ``"radius"``: to all
        spots of its slice within ``radius`` (same units as the coordinates).
    k
        Neighbours for ``knn``; default from ``platform`` (see :data:`PLATFORM_K`), else 12.
    platform
        Platform for every slice; by default the per-slice platforms ``read_slices`` recorded.
    extra_edges
        Hook for edges across slices: ``(src, dst)`` arrays of spot indices, or a callable
        ``f(adata) -> (src, dst)``. They are made symmetric and added to the graph.

    Returns
    -------
    ``dgl.DGLGraph`` with ``n_obs`` nodes, symmetric, with self-loops, ``ndata["slice"]`` the
    slice index. Writes ``obsp[key_added]`` (CSR adjacency without self-loops) and
    ``uns["spamask"]["graph"]`` (parameters and edges per slice).
    """
    import dgl
    import torch

    require_obsm(adata, spatial_key)
    if method not in ("knn", "radius"):
        raise ConfigError(f"method={method!r}: use 'knn' or 'radius'")
    if method == "radius" and (radius is None or not radius > 0):
        raise ConfigError(f"radius={radius}: method='radius' needs a positive radius")
    codes = batch_codes(adata, batch_key)
    names = list(adata.obs[batch_key].cat.categories)
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2 or not np.isfinite(coords).all():
        raise InputError(f"obsm[{spatial_key!r}]: expected finite (n_spots, 2) coordinates")
    platforms = _platforms(adata, names, platform)
    ks = {}
    graphs, per_slice_edges, order = [], {}, []
    for code, name in enumerate(names):
        idx = np.flatnonzero(codes == code)
        if idx.size == 0:
            continue
        k_s = _choose_k(k, platforms[name]) if method == "knn" else None
        ks[name] = k_s or 0
        src, dst = _slice_edges(coords[idx, :2], name, method, k_s, radius)
        per_slice_edges[name] = int(src.size)
        g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=idx.size)
        graphs.append(dgl.add_self_loop(g))
        order.append(idx)
    order_all = np.concatenate(order)
    graph = dgl.batch(graphs)
    if not np.array_equal(order_all, np.arange(adata.n_obs)):
        graph = _relabel(graph, order_all, adata.n_obs)
    if extra_edges is not None:
        graph = _add_extra(graph, extra_edges, adata)
    graph.ndata["slice"] = torch.from_numpy(codes)
    adj = _adjacency(graph, adata.n_obs)
    adata.obsp[key_added] = adj
    record(adata, "graph", {
        "method": method, "k": ks, "radius": float(radius or 0), "batch_key": batch_key,
        "spatial_key": spatial_key, "edges_per_slice": per_slice_edges,
        "n_edges": int(adj.nnz), "cross_slice_edges": int(_cross_slice(adj, codes)),
        "key_added": key_added,
    })
    logger.info("graph: %d spots, %d directed edges (+%d self-loops), %d slices",
                adata.n_obs, adj.nnz, adata.n_obs, len(graphs))
    return graph


def to_dgl(adata: ad.AnnData, batch_key: str = Keys.BATCH, key: str = Keys.CONNECTIVITIES):
    """Rebuild the DGL graph (self-loops added) from the adjacency stored in ``obsp[key]``."""
    import dgl
    import torch

    if key not in adata.obsp:
        raise InputError(f"obsp[{key!r}] not found; run build_graph() first")
    coo = sp.coo_matrix(symmetric_structure(adata.obsp[key], f"obsp[{key!r}]"))
    g = dgl.graph((torch.from_numpy(coo.row.astype(np.int64)),
                   torch.from_numpy(coo.col.astype(np.int64))), num_nodes=adata.n_obs)
    g = dgl.add_self_loop(dgl.remove_self_loop(g))
    g.ndata["slice"] = torch.from_numpy(batch_codes(adata, batch_key))
    return g


def symmetric_structure(adj, where: str = "the graph") -> sp.csr_matrix:
    """The edges of an adjacency matrix as a symmetric 0/1 CSR matrix without self-loops.

    Stored zeros are not edges, duplicated entries count once, and an edge whose reverse is
    missing gets it (with a warning naming ``where``): edge masking hides undirected pairs,
    so a graph from elsewhere (squidpy, a directed kNN) must be made undirected first.
    """
    adj = sp.coo_matrix(adj)
    if adj.shape[0] != adj.shape[1]:
        raise InputError(f"{where}: adjacency of shape {adj.shape} is not square")
    keep = (adj.data != 0) & (adj.row != adj.col)
    entries = int(keep.sum())
    ones = sp.csr_matrix((np.ones(entries, dtype=np.float32), (adj.row[keep], adj.col[keep])),
                         shape=adj.shape)
    ones.data[:] = 1.0  # the constructor summed duplicates
    duplicated = entries - ones.nnz
    sym = ones.maximum(ones.T).tocsr()
    added = sym.nnz - ones.nnz
    if duplicated or added:
        logger.warning("%s: %d duplicated entries counted once, %d edges without their reverse "
                       "given one; the graph is made undirected", where, duplicated, added)
    sym.sort_indices()
    return sym


def lattice_neighbours(xy: np.ndarray, tolerance: float = 0.2, share: float = 0.6) -> int:
    """First-order neighbours per spot when the spots of one slice sit on a regular lattice
    (6 on Visium's hexagonal grid, 4 on a square grid), else 0 (single cells, beads, a
    jittered or irregular layout).

    A spot's first-order neighbours are the spots within ``1 + tolerance`` times the distance
    to its nearest one (the next shell of a square grid lies at sqrt(2), of a hexagonal one at
    sqrt(3)). The slice is a lattice when at least ``share`` of its spots (spots at the edge
    have fewer) have the same count, 4 or 6. Decided from the coordinates alone, not from a
    platform's name.
    """
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    if xy.shape[0] < 8:
        return 0
    dist, _ = KDTree(xy).query(xy, k=8)
    dist = dist[:, 1:]
    first = dist[:, :1]
    if not (first > 0).all():  # spots on top of each other: not a lattice
        return 0
    counts = (dist <= (1 + tolerance) * first).sum(axis=1)
    mode = int(np.bincount(counts).argmax())
    return mode if mode in (4, 6) and np.mean(counts == mode) >= share else 0


def _platforms(adata: ad.AnnData, names: list[str], platform: str | None) -> dict[str, str]:
    recorded = adata.uns.get(Keys.UNS, {}).get("read", {}).get("platforms", {})
    return {n: (platform or recorded.get(n) or "unknown").lower() for n in names}


def _choose_k(k: int | None, platform: str) -> int:
    if k is not None:
        if int(k) < 1:
            raise ConfigError(f"k={k}: must be a positive integer")
        return int(k)
    return PLATFORM_K.get(platform, DEFAULT_K)


def _slice_edges(xy: np.ndarray, name: str, method: str, k: int | None,
                 radius: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric edges (no self-loops) of one slice, in local indices."""
    n = xy.shape[0]
    tree = KDTree(xy)
    if method == "knn":
        if n < k + 1:
            raise InputError(f"slice {name!r}: {n} spots, fewer than k + 1 = {k + 1}; "
                             "lower k or drop the slice")
        _, nbr = tree.query(xy, k=k + 1)
        src = np.repeat(np.arange(n), k + 1)
        dst = nbr.ravel()
    else:
        nbrs = tree.query_radius(xy, r=radius)
        src = np.repeat(np.arange(n), [len(a) for a in nbrs])
        dst = np.concatenate(nbrs) if n else np.empty(0, dtype=np.int64)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    pairs = np.unique(np.concatenate([src * n + dst, dst * n + src]))
    return (pairs // n).astype(np.int64), (pairs % n).astype(np.int64)


def _relabel(graph, order: np.ndarray, n: int):
    import dgl
    import torch

    src, dst = graph.edges()
    perm = torch.from_numpy(order)
    return dgl.graph((perm[src], perm[dst]), num_nodes=n)


def _add_extra(graph, extra: ExtraEdges, adata: ad.AnnData):
    import dgl
    import torch

    src, dst = extra(adata) if callable(extra) else extra
    src = torch.as_tensor(np.asarray(src), dtype=torch.int64)
    dst = torch.as_tensor(np.asarray(dst), dtype=torch.int64)
    if src.shape != dst.shape or (src.numel() and (max(src.max(), dst.max()) >= adata.n_obs)):
        raise InputError("extra_edges: src and dst must be equal-length arrays of spot indices")
    g_src, g_dst = graph.edges()
    src_all = torch.cat([g_src, src, dst])
    dst_all = torch.cat([g_dst, dst, src])
    g = dgl.graph((src_all, dst_all), num_nodes=adata.n_obs)
    return dgl.to_simple(g)


def _adjacency(graph, n: int) -> sp.csr_matrix:
    src, dst = graph.edges()
    src, dst = src.numpy(), dst.numpy()
    keep = src != dst
    adj = sp.csr_matrix((np.ones(keep.sum(), dtype=np.float32), (src[keep], dst[keep])),
                        shape=(n, n))
    adj.sum_duplicates()
    adj.data[:] = 1.0
    return adj


def _cross_slice(adj: sp.csr_matrix, codes: np.ndarray) -> int:
    coo = adj.tocoo()
    return int((codes[coo.row] != codes[coo.col]).sum())


def spatial_tiles(coords: np.ndarray, codes: np.ndarray, tile_size: int) -> np.ndarray:
    """Tile id of every spot: runs of ``tile_size`` spots along a Z-order curve in each slice.

    Spots of a tile are spatial neighbours, so a minibatch made of a few random tiles shares
    most of its sampled neighbourhood instead of growing a separate 3-hop ball per seed.
    """
    tiles = np.empty(len(codes), dtype=np.int64)
    next_id = 0
    for code in np.unique(codes):
        idx = np.flatnonzero(codes == code)
        xy = coords[idx, :2].astype(np.float64)
        span = np.maximum(xy.max(axis=0) - xy.min(axis=0), 1e-12)
        grid = ((xy - xy.min(axis=0)) / span * 65535).astype(np.uint64)
        order = idx[np.argsort(_interleave(grid[:, 0]) | (_interleave(grid[:, 1]) << 1),
                               kind="stable")]
        tiles[order] = next_id + np.arange(len(order)) // tile_size
        next_id = int(tiles[order].max()) + 1
    return tiles


def _interleave(v: np.ndarray) -> np.ndarray:
    """Spread the 16 low bits of ``v`` to the even bit positions (Morton code half)."""
    v = v & np.uint64(0xFFFF)
    for shift, mask in ((8, 0x00FF00FF), (4, 0x0F0F0F0F), (2, 0x33333333), (1, 0x55555555)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v
