import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import spamask_integrate as si
from spamask_integrate.baselines import banksy, smoothed_pca

pytest.importorskip("banksy", reason="the BANKSY peer needs the 'peers' extra (pybanksy)")


@pytest.fixture
def noisy(tiny_slices):
    si.preprocess(tiny_slices, n_top_genes=None, n_comps=20, min_cells=5)
    si.build_graph(tiny_slices, k=6)
    return tiny_slices


def _ari(adata, rep):
    si.cluster(adata, 4, use_rep=rep, seed=0)
    return adjusted_rand_score(adata.obs["ground_truth"], adata.obs["domain"])


def test_banksy_neighbourhood_recovers_what_single_spots_cannot(noisy):
    banksy(noisy, lambda_=0.0, seed=0, key_added="X_expr_only")
    banksy(noisy, lambda_=0.8, seed=0)
    emb = noisy.obsm["X_banksy"]
    assert emb.shape == (noisy.n_obs, 20) and np.isfinite(emb).all()
    expr_only, with_neighbours = _ari(noisy, "X_expr_only"), _ari(noisy, "X_banksy")
    assert expr_only < 0.3 and with_neighbours > expr_only + 0.3
    rec = noisy.uns["spamask"]["banksy"]
    assert rec["lambda"] == 0.8 and rec["agf_centred"] is True


def test_banksy_is_seeded_and_checks_its_input(noisy):
    banksy(noisy, lambda_=0.2, seed=3, key_added="a")
    banksy(noisy, lambda_=0.2, seed=3, key_added="b")
    assert np.array_equal(noisy.obsm["a"], noisy.obsm["b"])
    with pytest.raises(si.InputError, match="lambda_"):
        banksy(noisy, lambda_=1.0)
    with pytest.raises(si.InputError, match="k_geom"):
        banksy(noisy, k_geom=200)
    raw = si.datasets.synthetic_slices(1, 100, 20, 2, seed=0)
    with pytest.raises(si.InputError, match="preprocess"):
        banksy(raw)


def test_smoothed_pca_averages_over_neighbours(noisy):
    smoothed_pca(noisy)
    assert _ari(noisy, "X_pca_smoothed") > _ari(noisy, "X_pca") + 0.3


def test_graphst_is_seeded_leaves_global_state_and_checks_its_input(noisy, monkeypatch):
    pytest.importorskip("GraphST", reason="the GraphST peer needs the 'peers' extra")
    import random

    import torch

    from spamask_integrate import baselines

    before = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    baselines.graphst(noisy, seed=1, epochs=20, key_added="a")
    after = (np.random.get_state()[1], random.getstate(), torch.get_rng_state())
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    assert torch.equal(before[2], after[2])
    baselines.graphst(noisy, seed=1, epochs=20, key_added="b")
    baselines.graphst(noisy, seed=2, epochs=20, key_added="c")
    assert noisy.obsm["a"].shape == (noisy.n_obs, 20) and np.isfinite(noisy.obsm["a"]).all()
    assert np.array_equal(noisy.obsm["a"], noisy.obsm["b"])
    assert not np.allclose(noisy.obsm["a"], noisy.obsm["c"])
    assert noisy.uns["spamask"]["graphst"]["epochs"] == 20
    logged = noisy.copy()
    logged.layers["counts"] = logged.X  # log-normalised values where counts belong
    with pytest.raises(si.InputError, match="raw counts"):
        baselines.graphst(logged, epochs=1)
    monkeypatch.setattr(baselines, "GRAPHST_MAX_SPOTS", noisy.n_obs - 1)
    with pytest.raises(si.InputError, match="dense n x n"):
        baselines.graphst(noisy, epochs=1)


def test_graphst_sparse_readout_gives_the_package_embedding(noisy):
    pytest.importorskip("GraphST", reason="the GraphST peer needs the 'peers' extra")
    from spamask_integrate import baselines

    baselines.graphst(noisy, seed=0, epochs=10, sparse_readout=False, key_added="dense")
    baselines.graphst(noisy, seed=0, epochs=10, key_added="sparse")
    # the same sums, perhaps in another order on another CPU's BLAS (bit for bit here)
    np.testing.assert_allclose(noisy.obsm["sparse"], noisy.obsm["dense"], rtol=0, atol=1e-4)


def test_banksy_takes_the_lattice_recipe_on_a_visium_grid(noisy):
    """On a hexagonal grid BANKSY uses the first-order neighbours and no Gabor filter (its
    authors' Visium setting); on single cells or a jittered layout the package defaults."""
    jittered = noisy.copy()
    banksy(jittered, lambda_=0.8, seed=0)
    settings = jittered.uns["spamask"]["banksy"]["per_slice"]
    assert {s["k_geom"] for s in settings.values()} == {15}
    assert {s["max_m"] for s in settings.values()} == {1}

    # the same spots on a hexagonal grid: each grid point (the jitter rounded off) moved to
    # its place in a hexagonal lattice, so the planted bands keep their shape
    grid = np.round(noisy.obsm["spatial"])
    row, col = grid[:, 1], grid[:, 0]
    noisy.obsm["spatial"] = np.stack([col + 0.5 * (row % 2), row * np.sqrt(3) / 2], 1) * 137
    banksy(noisy, lambda_=0.0, seed=0, key_added="X_expr_only")
    banksy(noisy, lambda_=0.8, seed=0)
    settings = noisy.uns["spamask"]["banksy"]["per_slice"]
    assert [(s["lattice"], s["k_geom"], s["max_m"]) for s in settings.values()] == [(6, 6, 0)] * 2
    assert noisy.obsm["X_banksy"].shape == (noisy.n_obs, 20)
    assert _ari(noisy, "X_banksy") > _ari(noisy, "X_expr_only") + 0.3

    banksy(noisy, lambda_=0.8, k_geom=10, max_m=1, seed=0, key_added="X_set")
    settings = noisy.uns["spamask"]["banksy"]["per_slice"]
    assert {(s["k_geom"], s["max_m"]) for s in settings.values()} == {(10, 1)}

    # one slice on the grid, the other not: their blocks would differ, so it says so
    mixed = noisy.copy()
    first = (mixed.obs["slice"] == mixed.obs["slice"].cat.categories[0]).to_numpy()
    mixed.obsm["spatial"][first] = jittered.obsm["spatial"][first]
    with pytest.raises(si.InputError, match="is a grid of spots and slice .* is not"):
        banksy(mixed)
    banksy(mixed, max_m=0, key_added="X_mixed")  # the same blocks for both: it runs
    with pytest.raises(si.InputError, match="max_m"):
        banksy(mixed, max_m=-1)
