import numpy as np
import pytest

import spamask_integrate as si
from conftest import assert_symmetric, logged_warnings


def _cross(graph):
    src, dst = graph.edges()
    s = graph.ndata["slice"]
    return int((s[src] != s[dst]).sum())


def test_block_diagonal_symmetric_self_loops(tiny_slices):
    g = si.build_graph(tiny_slices, k=6)
    assert g.num_nodes() == tiny_slices.n_obs
    assert_symmetric(g)
    assert bool(g.has_edges_between(np.arange(g.num_nodes()), np.arange(g.num_nodes())).all())
    assert _cross(g) == 0
    assert g.in_degrees().min() >= 7  # k neighbours + self
    info = tiny_slices.uns["spamask"]["graph"]
    assert set(info["edges_per_slice"]) == {"slice0", "slice1"}
    assert info["cross_slice_edges"] == 0
    adj = tiny_slices.obsp["spamask_connectivities"]
    assert (adj != adj.T).nnz == 0 and adj.diagonal().sum() == 0


def test_knn_neighbours_are_nearest(tiny_slices):
    si.build_graph(tiny_slices, k=4)
    adj = tiny_slices.obsp["spamask_connectivities"].tocsr()
    xy = tiny_slices.obsm["spatial"]
    i = 17
    nbrs = adj[i].indices
    d = np.linalg.norm(xy[:300] - xy[i], axis=1)
    nearest = set(np.argsort(d)[1:5])
    assert nearest <= set(nbrs)


def test_radius_graph(tiny_slices):
    g = si.build_graph(tiny_slices, method="radius", radius=1.6)
    assert_symmetric(g)
    assert _cross(g) == 0
    src, dst = (t.numpy() for t in g.edges())
    xy = tiny_slices.obsm["spatial"]
    assert np.linalg.norm(xy[src] - xy[dst], axis=1).max() <= 1.6 + 1e-9


def test_platform_preset_visium(tiny_slices):
    si.build_graph(tiny_slices, platform="visium")
    assert tiny_slices.uns["spamask"]["graph"]["k"]["slice0"] == 6


def test_cross_slice_hook(tiny_slices):
    g = si.build_graph(tiny_slices, k=6, extra_edges=(np.array([0, 1]), np.array([300, 301])))
    assert_symmetric(g)
    assert _cross(g) == 4
    assert tiny_slices.uns["spamask"]["graph"]["cross_slice_edges"] == 4


def test_non_contiguous_slices_keep_anndata_order(tiny_slices):
    perm = np.random.default_rng(0).permutation(tiny_slices.n_obs)
    shuffled = tiny_slices[perm].copy()
    g = si.build_graph(shuffled, k=6)
    assert _cross(g) == 0
    assert np.array_equal(g.ndata["slice"].numpy(), shuffled.obs["slice"].cat.codes.to_numpy())


def test_to_dgl_roundtrip(tiny_slices):
    g = si.build_graph(tiny_slices, k=6)
    g2 = si.to_dgl(tiny_slices)
    assert g2.num_edges() == g.num_edges()


def test_errors(tiny_slices):
    with pytest.raises(si.ConfigError, match="method"):
        si.build_graph(tiny_slices, method="delaunay")
    with pytest.raises(si.ConfigError, match="radius"):
        si.build_graph(tiny_slices, method="radius")
    small = tiny_slices[:305].copy()
    with pytest.raises(si.InputError, match="slice1"):
        si.build_graph(small, k=6)
    with pytest.raises(si.InputError, match="obs\\['sample'\\]"):
        si.build_graph(tiny_slices, batch_key="sample")


def test_spatial_tiles_are_compact_and_within_slices(tiny_slices):
    from spamask_integrate.graph import spatial_tiles

    xy = tiny_slices.obsm["spatial"]
    codes = tiny_slices.obs["slice"].cat.codes.to_numpy()
    tiles = spatial_tiles(xy, codes, 32)
    sizes = np.bincount(tiles)
    assert sizes.max() <= 32 and sizes.sum() == 600
    for t in np.unique(tiles):
        assert len(np.unique(codes[tiles == t])) == 1  # a tile never spans two slices
    spread = np.mean([xy[tiles == t].std(axis=0).mean() for t in np.unique(tiles)])
    random_spread = xy[:300].std(axis=0).mean()
    assert spread < 0.5 * random_spread


def test_to_dgl_makes_a_foreign_graph_undirected(tiny_slices):
    import scipy.sparse as sp

    si.build_graph(tiny_slices, k=6)
    clean = si.to_dgl(tiny_slices)
    adj = sp.triu(tiny_slices.obsp["spamask_connectivities"], k=1).tocoo()  # one direction
    rows = np.concatenate([adj.row, adj.row[:5], [0]])  # 5 duplicated entries, 1 stored zero
    cols = np.concatenate([adj.col, adj.col[:5], [7]])
    data = np.concatenate([adj.data, adj.data[:5], [0.0]])
    order = np.lexsort((cols, rows))
    indptr = np.searchsorted(rows[order], np.arange(adj.shape[0] + 1))
    raw = sp.csr_matrix((data[order], cols[order], indptr), shape=adj.shape)  # kept as given
    assert raw.nnz == adj.nnz + 6
    tiny_slices.obsp["directed"] = raw
    with logged_warnings("spamask_integrate.graph") as warned:
        g = si.to_dgl(tiny_slices, key="directed")
    assert any("5 duplicated entries" in m and "made undirected" in m for m in warned)
    assert g.num_edges() == clean.num_edges()
    src, dst = g.edges()
    assert g.has_edges_between(dst, src).all()


def test_edge_masker_rejects_a_directed_or_repeated_graph():
    import dgl
    import torch

    from spamask_integrate.sampling import EdgeMasker

    u = torch.tensor([0, 1, 1, 2, 0, 1, 2])
    v = torch.tensor([1, 0, 2, 1, 0, 1, 2])
    EdgeMasker(dgl.graph((u, v)), "undirected", 0.2)  # symmetric with self-loops: fine
    with pytest.raises(si.InputError, match="not symmetric: 1 of its 6 edges"):
        EdgeMasker(dgl.graph((u[1:], v[1:])), "undirected", 0.2)
    with pytest.raises(si.InputError, match="1 duplicated edges"):
        EdgeMasker(dgl.graph((torch.cat([u, u[:1]]), torch.cat([v, v[:1]]))), "undirected", 0.2)


def hex_lattice(rows: int, cols: int, spacing: float = 137.0, seed: int = 0) -> np.ndarray:
    """Visium-like spot centres: a hexagonal grid, each centre moved by up to 1% of the
    spacing (the registration error of real Visium coordinates)."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    xy = np.stack([c + 0.5 * (r % 2), r * np.sqrt(3) / 2], axis=1) * spacing
    return xy + np.random.default_rng(seed).uniform(-0.01, 0.01, xy.shape) * spacing


def test_lattice_neighbours_reads_the_layout_from_the_coordinates(tiny_slices):
    from spamask_integrate.graph import lattice_neighbours

    assert lattice_neighbours(hex_lattice(20, 30)) == 6
    square = np.stack(np.divmod(np.arange(600), 30), axis=1).astype(float) * 100.0
    assert lattice_neighbours(square) == 4
    assert lattice_neighbours(square[::-1] + 5e4) == 4  # order and offset do not matter
    rng = np.random.default_rng(0)
    assert lattice_neighbours(rng.uniform(0, 1000, (600, 2))) == 0  # single cells
    assert lattice_neighbours(tiny_slices.obsm["spatial"][:300]) == 0  # a jittered grid
    assert lattice_neighbours(hex_lattice(1, 5)) == 0  # too few spots to tell
    assert lattice_neighbours(np.repeat(hex_lattice(20, 30), 2, axis=0)) == 0  # duplicates
