import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spamask_integrate as si
from spamask_integrate.context import _unit


def _two_slices(n_per=40, emb_dims=8, seed=0):
    """Two slices on the same 8 x 5 grid, a 2-column model input and an 8-d embedding."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per
    adata = ad.AnnData(np.zeros((n, 1), dtype=np.float32))
    adata.obs_names = [f"s{i}" for i in range(n)]
    adata.obs["slice"] = pd.Categorical(np.repeat(["a", "b"], n_per))
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(n_per // 8)), -1).reshape(-1, 2)
    adata.obsm["spatial"] = np.vstack([grid, grid]).astype(float)
    adata.obsm["X_pca"] = rng.normal(size=(n, 2))
    adata.obsm["X_spamask"] = rng.normal(size=(n, emb_dims)).astype(np.float32)
    si.build_graph(adata, "slice", k=4)
    return adata


def test_blocks_shapes_and_scales():
    adata = _two_slices()
    si.context_embedding(adata, "slice", weight=0.5, n_pcs=5)
    x = adata.obsm["X_spamask_context"]
    assert x.shape == (80, 5 + 4) and x.dtype == np.float32  # 2 input columns -> 4 context
    assert np.allclose(x.mean(0), 0, atol=1e-5)
    assert np.mean((x[:, :5] ** 2).sum(1)) == pytest.approx(1.0, rel=1e-5)
    assert np.mean((x[:, 5:] ** 2).sum(1)) == pytest.approx(0.25, rel=1e-5)  # weight ** 2
    rec = adata.uns["spamask"]["context"]
    assert rec["weight"] == 0.5 and rec["n_pcs"] == 5 and rec["n_context_pcs"] == 4


def test_weight_zero_is_the_reduced_embedding_alone():
    adata = _two_slices()
    si.context_embedding(adata, "slice", weight=0.0, n_pcs=5, seed=1)
    from spamask_integrate.cluster import reduce

    expected = _unit(reduce(adata.obsm["X_spamask"], 5, 1))
    assert np.allclose(adata.obsm["X_spamask_context"], expected, atol=1e-6)


def test_context_is_the_input_beside_its_same_slice_neighbour_mean():
    adata = _two_slices()
    # a graph with cross-slice edges (spot i of slice a to spot i of slice b): the context
    # must ignore them
    import scipy.sparse as sp

    cross = sp.coo_matrix((np.ones(40), (np.arange(40), np.arange(40) + 40)), shape=(80, 80))
    adata.obsp["spamask_connectivities"] = (adata.obsp["spamask_connectivities"]
                                            + cross + cross.T).tocsr()
    lam = 0.8
    si.context_embedding(adata, "slice", weight=1.0, lambda_=lam, n_pcs=5)
    block = adata.obsm["X_spamask_context"][:, 5:]
    # the 4 context columns are not reduced (4 <= 20): recompute them by hand from the graph
    x = adata.obsm["X_pca"]
    conn = adata.obsp["spamask_connectivities"].tocsr()
    slices = adata.obs["slice"].to_numpy()
    mean = np.empty_like(x)
    for i in range(adata.n_obs):
        nbrs = [j for j in conn[i].indices if j != i and slices[j] == slices[i]]
        assert nbrs  # every spot of the grid has neighbours in its own slice
        mean[i] = x[nbrs].mean(0)
    expected = _unit(np.hstack([np.sqrt(1 - lam) * x, np.sqrt(lam) * mean]))
    assert np.allclose(block, expected, atol=1e-5)
    # the other slice's input does not reach a slice's context
    before = block[:40].copy()
    adata.obsm["X_pca"][40:] += 100.0 * np.random.default_rng(5).normal(size=(40, 2))
    si.context_embedding(adata, "slice", weight=1.0, lambda_=lam, n_pcs=5)
    after = adata.obsm["X_spamask_context"][:40, 5:]
    # _unit centres and scales over all spots: compare up to that affine map, per column
    for c in range(4):
        assert abs(np.corrcoef(before[:, c], after[:, c])[0, 1]) > 1 - 1e-6


def test_a_spot_without_same_slice_neighbours_is_its_own_context():
    adata = _two_slices()
    import scipy.sparse as sp

    conn = sp.lil_matrix(adata.obsp["spamask_connectivities"])
    conn[0, :] = 0
    conn[:, 0] = 0  # spot 0 keeps no edge (the context ignores self-loops anyway)
    adata.obsp["spamask_connectivities"] = conn.tocsr()
    lam = 0.8
    si.context_embedding(adata, "slice", weight=1.0, lambda_=lam, n_pcs=5)
    block = adata.obsm["X_spamask_context"][:, 5:]
    x = adata.obsm["X_pca"]
    conn = adata.obsp["spamask_connectivities"]
    mean = np.vstack([x[0]] + [x[conn[i].indices[conn[i].indices != i]].mean(0)
                               for i in range(1, adata.n_obs)])
    expected = _unit(np.hstack([np.sqrt(1 - lam) * x, np.sqrt(lam) * mean]))
    assert np.allclose(block, expected, atol=1e-5)


def test_deterministic_under_a_seed():
    a, b = _two_slices(), _two_slices()
    a.obsm["X_pca"] = np.random.default_rng(3).normal(size=(80, 50))  # reduced by PCA
    b.obsm["X_pca"] = a.obsm["X_pca"].copy()
    for x in (a, b):
        si.context_embedding(x, "slice", n_pcs=5, n_context_pcs=6, seed=7)
    assert np.array_equal(a.obsm["X_spamask_context"], b.obsm["X_spamask_context"])
    assert a.obsm["X_spamask_context"].shape == (80, 11)


def test_errors():
    adata = _two_slices()
    with pytest.raises(si.ConfigError, match="weight"):
        si.context_embedding(adata, "slice", weight=-1)
    with pytest.raises(si.ConfigError, match="lambda_"):
        si.context_embedding(adata, "slice", lambda_=1.5)
    del adata.obsm["X_pca"]
    with pytest.raises(si.InputError, match="X_pca"):
        si.context_embedding(adata, "slice")
    for bad in (-0.5, float("inf")):  # refused before any training
        with pytest.raises(si.ConfigError, match="context_weight"):
            si.run(adata, None, context_weight=bad)


def test_run_clusters_the_context(tiny_slices):
    adata = si.run(tiny_slices, None, label_key="ground_truth", n_domains=4, k=6,
                   preprocess_kwargs=dict(n_top_genes=None, n_comps=20, min_cells=5),
                   scib=False, seed=3, epochs=15, hidden_dim=32, latent_dim=16,
                   edge_decoder_hidden=32)
    assert adata.uns["spamask"]["cluster"]["use_rep"] == "X_spamask_context_harmony"
    assert adata.obsm["X_spamask_context"].shape == (600, 16 + 20)
    assert adata.uns["spamask"]["run"]["params"]["context_weight"] == 0.5
    assert "context" in adata.uns["spamask"]["run"]["seconds"]


def test_caller_input_keys():
    adata = _two_slices()
    assert si.caller_input(adata, "slice", weight=0.5, harmony=False) == (
        "X_spamask", "X_spamask_context")
    assert "X_spamask_harmony" not in adata.obsm
    assert si.caller_input(adata, "slice", weight=0.0, harmony=True, seed=1) == (
        "X_spamask_harmony", "X_spamask_harmony")
    assert si.caller_input(adata, "slice", weight=0.5, harmony=True, seed=1) == (
        "X_spamask_harmony", "X_spamask_context_harmony")
    assert adata.obsm["X_spamask_context_harmony"].shape[0] == adata.n_obs
    stages = []

    class Step:
        def __init__(self, name):
            stages.append(name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    si.caller_input(adata, "slice", weight=0.5, harmony=True, step=Step)
    assert stages == ["context", "integrate"]
    with pytest.raises(si.ConfigError, match="context_weight"):
        si.caller_input(adata, "slice", weight=-1.0)
