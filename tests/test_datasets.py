import numpy as np
import scipy.sparse as sp

import spamask_integrate as si


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
