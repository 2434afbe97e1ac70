import numpy as np
import pytest

import spamask_integrate as si
from spamask_integrate.integrate import cells_by_dims


def test_harmony_orientation_both_shapes():
    z = np.arange(12.0).reshape(4, 3)  # 4 cells x 3 dims
    assert cells_by_dims(z, 4, 3) is not None and cells_by_dims(z, 4, 3).shape == (4, 3)
    assert np.array_equal(cells_by_dims(z.T, 4, 3), z)  # harmonypy 0.0.x: dims x cells
    with pytest.raises(si.InputError, match="shape"):
        cells_by_dims(np.zeros((5, 5)), 4, 3)


def test_integrate_removes_planted_shift():
    rng = np.random.default_rng(0)
    n = 400
    truth = rng.integers(0, 2, n)
    batch = np.repeat([0, 1], n // 2)
    domain_axis = np.array([4.0, 4.0, 4.0, 0.0, 0.0])
    slice_axis = np.array([0.0, 0.0, 3.0, 3.0, -3.0])
    x = truth[:, None] * domain_axis + batch[:, None] * slice_axis + rng.normal(0, 0.5, (n, 5))
    a = si.datasets.synthetic_slices(2, n // 2, 10, 2, seed=0)
    a.obsm["X_spamask"] = x
    si.integrate(a, n_pcs=None)
    z = a.obsm["X_spamask_harmony"]
    assert z.shape == (n, 5)

    def gap(m):  # distance between the slices' means within each true domain
        return np.mean([np.linalg.norm(m[(batch == 0) & (truth == t)].mean(0)
                                       - m[(batch == 1) & (truth == t)].mean(0)) for t in (0, 1)])

    def separation(m):  # distance between the domains
        return np.linalg.norm(m[truth == 0].mean(0) - m[truth == 1].mean(0))

    assert gap(z) < 0.5 * gap(x)
    assert separation(z) > 0.5 * separation(x)
    assert a.uns["spamask"]["integrate"]["method"] == "harmony"


def test_integrate_single_slice_is_a_no_op():
    a = si.datasets.synthetic_slices(1, 100, 10, 2, seed=0)
    a.obsm["X_spamask"] = np.random.default_rng(0).normal(size=(100, 8))
    si.integrate(a, n_pcs=None)
    assert np.allclose(a.obsm["X_spamask_harmony"], a.obsm["X_spamask"], atol=1e-6)
    assert a.uns["spamask"]["integrate"]["method"] == "none"
