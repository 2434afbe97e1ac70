import numpy as np
import pytest
import scipy.sparse as sp

import spamask_integrate as si
from conftest import logged_warnings


def test_pca_matches_dense_per_slice_scaling(tiny_slices):
    si.preprocess(tiny_slices, n_top_genes=None, n_comps=10, min_cells=1, min_counts=1)
    counts = tiny_slices.layers["counts"].toarray().astype(np.float64)
    x = counts / counts.sum(axis=1, keepdims=True) * 1e6  # the model input is CPM, no log
    z = np.zeros_like(x, dtype=np.float64)
    for s in ("slice0", "slice1"):
        m = (tiny_slices.obs["slice"] == s).to_numpy()
        sd = x[m].std(axis=0, ddof=1)
        sd[sd == 0] = 1
        z[m] = (x[m] - x[m].mean(axis=0)) / sd
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    expected = u[:, :10] * s[:10]
    got = tiny_slices.obsm["X_pca"]
    assert got.shape == (600, 10) and got.dtype == np.float32
    # 4 domains give 3 signal components; past them the noise spectrum is flat, where a
    # randomized SVD is exact only to ~1% in the singular values
    assert np.allclose(np.linalg.norm(got, axis=0)[:3], s[:3], rtol=1e-4)
    assert np.allclose(np.linalg.norm(got, axis=0), s[:10], rtol=1e-2)
    for j in range(3):  # the leading, well separated components agree up to sign
        assert abs(np.corrcoef(expected[:, j], got[:, j])[0, 1]) > 0.999


def test_hvgs_records_and_counts(tiny_slices):
    raw = tiny_slices.X.copy()
    si.preprocess(tiny_slices, n_top_genes=50, n_comps=15, min_cells=5, log1p=True)
    assert tiny_slices.var["highly_variable"].sum() == 50
    assert (tiny_slices.layers["counts"] != raw[:, :tiny_slices.n_vars]).nnz == 0 or \
        tiny_slices.layers["counts"].shape[1] <= raw.shape[1]
    params = tiny_slices.uns["spamask"]["preprocess"]
    assert params["n_top_genes"] == 50 and params["log1p"] is True and params["n_comps"] == 15
    assert tiny_slices.obsm["X_pca"].shape == (600, 15)


def test_hvg_input_stays_sparse(tiny_slices):
    si.preprocess(tiny_slices, n_top_genes=40, n_comps=None, min_cells=5)
    assert sp.issparse(tiny_slices.obsm["X_hvg"])
    assert tiny_slices.obsm["X_hvg"].shape == (600, 40)
    assert tiny_slices.uns["spamask"]["preprocess"]["input_key"] == "X_hvg"


def test_deterministic(tiny_slices):
    b = tiny_slices.copy()
    si.preprocess(tiny_slices, n_top_genes=None, n_comps=10, min_cells=5, seed=3)
    si.preprocess(b, n_top_genes=None, n_comps=10, min_cells=5, seed=3)
    assert np.array_equal(tiny_slices.obsm["X_pca"], b.obsm["X_pca"])


def test_pca_projection_split_into_threads_changes_no_bit(monkeypatch):
    """The PCA scores are projected in row blocks, one per thread: 1, 2 or 3 threads must give
    the same scores, bit for bit."""
    import importlib

    pre = importlib.import_module("spamask_integrate.preprocess")
    rng = np.random.default_rng(0)
    x = sp.random(3001, 80, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    codes = np.repeat([0, 1, 2], [1000, 1000, 1001])
    results = []
    for workers in (1, 2, 3):
        monkeypatch.setattr(pre, "blas_threads", lambda w=workers: w)
        results.append(pre._scaled_pca(x, codes, 12, scale=True, seed=0, n_groups=3))
    for scores, ratio in results[1:]:
        assert np.array_equal(scores, results[0][0]) and np.array_equal(ratio, results[0][1])
    assert results[0][0].shape == (3001, 12) and np.isfinite(results[0][0]).all()


def test_errors(tiny_slices):
    with pytest.raises(si.InputError, match="min_cells"):
        si.preprocess(tiny_slices.copy(), min_cells=10_000)
    with pytest.raises(si.InputError, match="obs\\['batch'\\]"):
        si.preprocess(tiny_slices.copy(), batch_key="batch")
    with pytest.raises(si.ConfigError, match="n_comps"):
        si.preprocess(tiny_slices.copy(), n_comps=0)


def test_x_is_log_normalised_for_scanpy(tiny_slices):
    """X is what scanpy's downstream tools expect: log1p of counts per 10,000 on all kept
    genes, with uns["log1p"] as sc.pp.log1p writes it; raw counts stay in layers."""
    si.preprocess(tiny_slices, n_top_genes=50, n_comps=10, min_cells=5)
    counts = tiny_slices.layers["counts"].toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    assert tiny_slices.X.shape == counts.shape  # all kept genes, not only the HVGs
    assert np.allclose(tiny_slices.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert tiny_slices.uns["log1p"].get("base") is None  # natural log for scanpy
    assert np.allclose(counts, np.round(counts))


def test_block_statistics_equal_dense_sums():
    """Gene statistics read the stored entries a block at a time (bounded memory); with blocks
    far smaller than the matrix they equal the dense sums, per slice and overall."""
    import importlib

    pp = importlib.import_module("spamask_integrate.preprocess")
    rng = np.random.default_rng(0)
    x = sp.random(500, 40, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x[3] = 0  # an empty row
    x.eliminate_zeros()
    codes = rng.integers(0, 4, 500)
    dense = x.toarray().astype(np.float64)
    for chunk in (7, 100, 1 << 22):  # blocks of a few rows, and one block
        total, sq, nnz = pp._column_moments(x, chunk=chunk)
        np.testing.assert_allclose(total, dense.sum(0))
        np.testing.assert_allclose(sq, (dense ** 2).sum(0))
        np.testing.assert_array_equal(nnz, (dense != 0).sum(0))
        g_total, g_sq, _ = pp._group_moments(x, codes, 5, chunk=chunk)
        assert g_total.shape == (5, 40)
        for c in range(5):
            np.testing.assert_allclose(g_total[c], dense[codes == c].sum(0), atol=1e-9)
            np.testing.assert_allclose(g_sq[c], (dense[codes == c] ** 2).sum(0), atol=1e-9)


def test_preprocess_keeps_counts_once(tiny_slices):
    """X is rebuilt from the counts: afterwards the counts layer and X are separate matrices,
    the counts unchanged and X their log-normalised values."""
    adata = tiny_slices.copy()
    raw = sp.csr_matrix(adata.X, dtype=np.float32).copy()
    si.preprocess(adata, n_top_genes=30, n_comps=10, min_cells=5)
    counts = adata.layers["counts"]
    assert counts is not adata.X and not np.shares_memory(counts.data, adata.X.data)
    kept = [list(tiny_slices.var_names).index(g) for g in adata.var_names]
    np.testing.assert_array_equal(counts.toarray(), raw[:, kept].toarray())
    totals = np.asarray(counts.sum(axis=1)).ravel()
    np.testing.assert_allclose(adata.X.toarray(),
                               np.log1p(counts.toarray() / totals[:, None] * 1e4), rtol=1e-5)


def test_failed_preprocess_leaves_counts_in_x(tiny_slices, monkeypatch):
    """preprocess drops X while it works; when a step fails, X holds the counts again."""
    import importlib

    pp = importlib.import_module("spamask_integrate.preprocess")

    def fail(*_a, **_k):
        raise si.InputError("seurat_v3 HVG selection failed on slice 'slice0'")

    monkeypatch.setattr(pp, "_select_hvgs", fail)
    adata = tiny_slices.copy()
    raw = sp.csr_matrix(adata.X, dtype=np.float32).toarray()
    with pytest.raises(si.InputError, match="slice0"):
        si.preprocess(adata, min_cells=5)
    assert adata.X is not None
    np.testing.assert_array_equal(adata.X.toarray(), raw)


def _hvg_input(adata):
    """``adata`` with the counts layer and categorical slices preprocess gives _select_hvgs."""
    adata.layers["counts"] = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs["slice"] = adata.obs["slice"].astype("category")
    return adata


def test_seurat_v3_statistics_do_not_depend_on_the_block_size(tiny_slices):
    import importlib

    pp = importlib.import_module("spamask_integrate.preprocess")
    adata = _hvg_input(tiny_slices)
    codes = adata.obs["slice"].cat.codes.to_numpy().astype(np.int64)
    names = list(adata.obs["slice"].cat.categories)
    counts = adata.layers["counts"]
    total = pp._group_moments(counts, codes, 2)[0]
    whole = pp._seurat_v3_norm_vars(counts, codes, names, "slice", total, chunk=1 << 40)
    blocks = pp._seurat_v3_norm_vars(counts, codes, names, "slice", total, chunk=97)
    assert whole.shape == (2, adata.n_vars) and (whole > 0).all()
    np.testing.assert_allclose(blocks, whole, rtol=1e-12)
    assert np.array_equal(np.argsort(-blocks, axis=1), np.argsort(-whole, axis=1))


def test_hvgs_of_a_slice_without_variation_name_the_slice(tiny_slices):
    import importlib

    pp = importlib.import_module("spamask_integrate.preprocess")
    adata = _hvg_input(tiny_slices)
    counts = adata.layers["counts"].tolil()
    counts[(adata.obs["slice"] == "slice1").to_numpy()] = 0  # nothing varies in slice1
    adata.layers["counts"] = counts.tocsr()
    with pytest.raises(si.InputError, match=r"seurat_v3 HVG selection failed on slice "
                                            r"'slice1' of obs\['slice'\]: only 0 genes vary"):
        pp._select_hvgs(adata, "slice", 50)
    halves = _hvg_input(tiny_slices.copy())
    halves.layers["counts"] = halves.layers["counts"] * 0.5
    with logged_warnings(pp.logger.name) as warned:
        pp._select_hvgs(halves, "slice", 50)
    assert any("non-integers" in m for m in warned)
