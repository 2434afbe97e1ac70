import numpy as np
import pytest
import scipy.sparse as sp

import spamask_integrate as si
from conftest import DLPFC, requires_dlpfc


def test_shapes_and_truth():
    a = si.datasets.synthetic_slices(3, 200, 50, 5, seed=0)
    assert a.shape == (600, 50)
    assert list(a.obs["slice"].cat.categories) == ["slice0", "slice1", "slice2"]
    assert a.obs["ground_truth"].nunique() == 5
    assert a.obsm["spatial"].shape == (600, 2)
    assert sp.issparse(a.X) and (a.X.data >= 0).all()
    assert np.allclose(a.X.data, np.round(a.X.data))


def test_seed_reproducible_and_different():
    a = si.datasets.synthetic_slices(2, 100, 30, 3, seed=5)
    b = si.datasets.synthetic_slices(2, 100, 30, 3, seed=5)
    c = si.datasets.synthetic_slices(2, 100, 30, 3, seed=6)
    assert (a.X != b.X).nnz == 0
    assert (a.X != c.X).nnz > 0


def test_batch_effect_shifts_slices():
    a = si.datasets.synthetic_slices(2, 400, 60, 3, batch_effect=1.0, seed=0)
    none = si.datasets.synthetic_slices(2, 400, 60, 3, batch_effect=0.0, seed=0)

    def slice_gap(x):
        m0 = np.log1p(np.asarray(x.X[:400].mean(axis=0))).ravel()
        m1 = np.log1p(np.asarray(x.X[400:].mean(axis=0))).ravel()
        return np.abs(m0 - m1).mean()

    assert slice_gap(a) > 3 * slice_gap(none)


def test_chunking_does_not_need_dense_matrix():
    a = si.datasets.synthetic_slices(1, 2500, 20, 3, seed=0, chunk_size=1000)
    assert a.n_obs == 2500 and sp.isspmatrix_csr(a.X)


def test_marker_genes_are_recorded_and_up_in_their_domain():
    a = si.datasets.synthetic_slices(2, 400, 60, 3, noise=0.3, seed=0)
    marker_of = a.var["marker_of"]
    assert marker_of.value_counts().to_dict() == {"D0": 20, "D1": 20, "D2": 20}
    x = np.log1p(a.X.toarray())
    for d in ("D0", "D1", "D2"):
        in_d = (a.obs["ground_truth"] == d).to_numpy()
        genes = (marker_of == d).to_numpy()
        assert x[in_d][:, genes].mean() > x[~in_d][:, genes].mean() + 0.3


def test_tiled_replicas_keep_labels_and_integer_counts():
    src = si.datasets.synthetic_slices(2, 300, 80, 4, seed=3)
    a = si.datasets.tile_slices(src, 1500, missing_genes=0.05, seed=0)
    assert a.n_obs == 1500 and a.n_vars == 80
    assert list(a.obs["slice"].cat.categories) == [
        "slice0_r0", "slice1_r1", "slice0_r2", "slice1_r3", "slice0_r4"]
    counts = src.layers["counts"]
    for r, name in enumerate(a.obs["slice"].cat.categories):
        rep = (a.obs["slice"] == name).to_numpy()
        s = r % 2
        orig = (src.obs["slice"] == f"slice{s}").to_numpy()
        # labels kept spot for spot
        assert np.array_equal(a.obs["ground_truth"][rep].to_numpy(),
                              src.obs["ground_truth"][orig].to_numpy())
        x = a.X[rep].toarray()
        assert np.array_equal(x, np.round(x)) and (x >= 0).all()
        assert (x <= counts[orig].toarray()).all() and x.sum() < counts[orig].sum()
        # a rigid motion: distances within the replica are the source's
        d = np.linalg.norm(a.obsm["spatial"][rep][:50, None] - a.obsm["spatial"][rep][None, :50],
                           axis=-1)
        d0 = np.linalg.norm(src.obsm["spatial"][orig][:50, None]
                            - src.obsm["spatial"][orig][None, :50], axis=-1)
        assert np.allclose(d, d0)
        lost = a.uns["tiling"]["missing_genes"][name]
        assert len(lost) == 4 and x[:, np.isin(a.var_names, lost)].sum() == 0
    # replicas of one source differ: other depth, other genes lost, other place
    r0, r2 = (a.obs["slice"] == "slice0_r0").to_numpy(), (a.obs["slice"] == "slice0_r2").to_numpy()
    assert (a.X[r0] != a.X[r2]).nnz > 0
    assert a.uns["tiling"]["missing_genes"]["slice0_r0"] != \
        a.uns["tiling"]["missing_genes"]["slice0_r2"]
    assert np.abs(a.obsm["spatial"][r0].mean(0) - a.obsm["spatial"][r2].mean(0)).max() > 10
    b = si.datasets.tile_slices(src, 1500, missing_genes=0.05, seed=0)
    assert (a.X != b.X).nnz == 0 and np.array_equal(a.obsm["spatial"], b.obsm["spatial"])


def test_tiling_crops_the_last_replica():
    src = si.datasets.synthetic_slices(2, 300, 40, 4, seed=3)
    a = si.datasets.tile_slices(src, 1450, seed=1)
    assert a.n_obs == 1450 and a.obs["slice"].value_counts()["slice0_r4"] == 250
    assert si.datasets.tile_slices(src, 1550, seed=1).n_obs == 1500  # 50 < min_spots left
    with pytest.raises(si.ConfigError, match="raw integer counts"):
        bad = src.copy()
        bad.layers["counts"] = bad.layers["counts"] * 0.5
        si.datasets.tile_slices(bad, 1000)


@requires_dlpfc
def test_tiled_dlpfc_keeps_its_layers():
    real = si.read_slices(sorted(DLPFC.glob("*.h5ad")), label_key="layer")
    a = si.datasets.tile_slices(real, 30_000, seed=0)
    assert 30_000 - 100 <= a.n_obs <= 30_000
    assert a.obs["slice"].nunique() == 11
    share = a.obs["layer"].value_counts(normalize=True)
    share0 = real.obs["layer"].value_counts(normalize=True)
    assert (share - share0).abs().max() < 0.02
    assert np.array_equal(a.X.data, np.round(a.X.data))
