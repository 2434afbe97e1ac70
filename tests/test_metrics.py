import numpy as np
import pandas as pd
import pytest

import spamask_integrate as si


@pytest.fixture
def labelled(tiny_slices):
    si.build_graph(tiny_slices, k=6)
    return tiny_slices


def _scores(table, metric, scope="all"):
    row = table[(table.kind == "domain") & (table.metric == metric) & (table.scope == scope)]
    return float(row.value.iloc[0])


def test_perfect_and_random_clustering(labelled):
    a = labelled
    a.obs["domain"] = a.obs["ground_truth"].cat.codes.astype(str).astype("category")
    t = si.evaluate(a, "ground_truth", scib=False)
    for scope in ("all", "slice0", "slice1"):
        for metric in ("ARI", "NMI", "homogeneity", "completeness"):
            assert _scores(t, metric, scope) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    a.obs["domain"] = pd.Categorical(rng.integers(0, 4, a.n_obs).astype(str))
    t = si.evaluate(a, "ground_truth", scib=False)
    assert abs(_scores(t, "ARI")) < 0.05
    assert set(t.columns) == {"kind", "scope", "embedding", "metric", "value"}
    assert "domain|all||ARI" in a.uns["spamask"]["metrics"]
    # the table reads back from uns (as from a saved integrated.h5ad), row for row
    back = si.metrics_table(a)
    pd.testing.assert_frame_equal(back, t.astype({"value": float}), check_dtype=False)
    del a.uns["spamask"]["metrics"]
    with pytest.raises(si.InputError, match="run evaluate"):
        si.metrics_table(a)


def test_unlabelled_spots_excluded(labelled):
    a = labelled
    a.obs["domain"] = a.obs["ground_truth"].cat.codes.astype(str).astype("category")
    labels = a.obs["ground_truth"].astype(object)
    labels.iloc[:25] = np.nan
    a.obs["truth"] = labels
    a.obs.loc[a.obs_names[:25], "domain"] = "0"  # wrong on the unlabelled ones: must not count
    t = si.evaluate(a, "truth", scib=False)
    assert _scores(t, "ARI") == pytest.approx(1.0)
    n_unl = t[(t.metric == "n_unlabelled")].value.iloc[0]
    assert n_unl == 25


def test_spatial_coherence_scores(labelled):
    a = labelled
    a.obs["domain"] = a.obs["ground_truth"].cat.codes.astype(str).astype("category")
    good = si.evaluate(a, None, scib=False)
    a.obs["domain"] = pd.Categorical(np.random.default_rng(0).integers(0, 4, a.n_obs).astype(str))
    bad = si.evaluate(a, None, scib=False)

    def val(t, m):
        return float(t[(t.metric == m) & (t.scope == "all")].value.iloc[0])

    assert val(good, "neighbour_agreement") > 0.8 > 0.4 > val(bad, "neighbour_agreement")
    assert val(good, "PAS") < val(bad, "PAS")
    assert val(good, "CHAOS") < val(bad, "CHAOS")


def test_scib_batch_score_improves_after_integrate():
    a = si.datasets.synthetic_slices(2, 150, 60, 3, batch_effect=1.0, seed=2)
    truth = a.obs["ground_truth"].cat.codes.to_numpy()
    batch = a.obs["slice"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 10))
    a.obsm["X_pca"] = centres[truth] + 3.0 * batch[:, None] + rng.normal(0, 1, (a.n_obs, 10))
    a.obsm["X_spamask"] = a.obsm["X_pca"].copy()
    si.integrate(a, n_pcs=None)
    a.obs["domain"] = a.obs["ground_truth"]
    t = si.evaluate(a, "ground_truth", embedding_keys=["X_spamask", "X_spamask_harmony"])
    integ = t[t.kind == "integration"].pivot_table(index="embedding", columns="metric",
                                                   values="value")
    before, after = integ.loc["X_spamask"], integ.loc["X_spamask_harmony"]
    assert after["Batch correction"] > before["Batch correction"] + 0.05
    assert after["Bio conservation"] >= before["Bio conservation"] - 0.02
    assert after["Total"] > before["Total"]


def test_scib_sample_sized_by_cost(monkeypatch):
    from spamask_integrate import metrics

    sizes = [metrics.scib_sample_size(e) for e in (1, 2, 3, 6)]
    assert sizes == sorted(sizes, reverse=True)  # more embeddings, fewer spots
    assert all(metrics.SCIB_MIN_SPOTS <= n <= metrics.SCIB_MAX_SPOTS for n in sizes)
    fixed, b = metrics.SCIB_COST
    n = sizes[2]  # the model puts 3 embeddings of n spots near the budget, not over it
    assert fixed + 3 * b * n * n <= metrics.SCIB_SECONDS or n == metrics.SCIB_MIN_SPOTS
    assert fixed + 3 * b * (n + 200) ** 2 > metrics.SCIB_SECONDS or n == metrics.SCIB_MAX_SPOTS
    # "auto" scores the sample the model allows and says so in the table
    monkeypatch.setattr(metrics, "SCIB_MIN_SPOTS", 100)
    monkeypatch.setattr(metrics, "SCIB_MAX_SPOTS", 200)
    x = si.datasets.synthetic_slices(2, 150, 60, 3, seed=2)
    rng = np.random.default_rng(0)
    x.obsm["X_pca"] = rng.normal(size=(x.n_obs, 8))
    x.obs["domain"] = x.obs["ground_truth"]
    t = si.evaluate(x, "ground_truth", embedding_keys=["X_pca"])
    info = t[t.kind == "info"].set_index("metric").value
    assert info["scib_n_spots"] == 200 and info["scib_sample_auto"] == 1
    fixed = si.evaluate(x, "ground_truth", embedding_keys=["X_pca"], scib_max_spots=250)
    finfo = fixed[fixed.kind == "info"].set_index("metric").value
    assert finfo["scib_n_spots"] == 250 and "scib_sample_auto" not in finfo
    with pytest.raises(si.ConfigError, match="scib_max_spots"):
        si.evaluate(x, "ground_truth", embedding_keys=["X_pca"], scib_max_spots="many")


def test_kbet_diffusion_neighbours_exact_inside_scib_only(monkeypatch):
    """scib's kBET searches each label's diffusion map with our exact kNN (no pynndescent
    compile) while scib runs, gives kBET the same answer, and leaves scib as it was after."""
    import gc

    import scib_metrics
    from scib_metrics.utils import _diffusion_nn

    from spamask_integrate import metrics

    module = _diffusion_nn.nearest_neighbors
    stock = module.pynndescent
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    res = metrics._exact_neighbours(x, 11)
    assert res.indices.shape == (120, 11)
    assert np.array_equal(res.indices[:, 0], np.arange(120))  # each point first
    dist = np.linalg.norm(x[:, None] - x[None], axis=2)
    assert np.allclose(np.sort(dist, axis=1)[:, :11], res.distances, atol=1e-4)
    with pytest.raises(ValueError):
        metrics._exact_neighbours(x[:8], 11)

    # kBET under the block: the search goes to the exact kNN, the heap is frozen meanwhile
    batches = np.repeat(["a", "b"], 60)
    labels = np.tile(["u", "v"], 60)
    graph = metrics._sklearn_neighbors(x, 50)
    calls = []
    exact = metrics._exact_neighbours

    def spy(data, n_neighbors, **kw):
        calls.append((len(data), n_neighbors))
        return exact(data, n_neighbors)

    monkeypatch.setattr(metrics, "_exact_neighbours", spy)
    with metrics._frozen_heap(), metrics._exact_diffusion_neighbours():
        assert gc.get_freeze_count() > 0
        score = scib_metrics.kbet_per_label(graph, batches, labels)
    assert len(calls) == 2 and all(n == 60 for n, _ in calls)  # one search per label
    assert 0.0 <= score <= 1.0
    assert module.pynndescent is stock and gc.get_freeze_count() == 0
    # the same neighbours by hand give the same kBET: nothing else changed
    monkeypatch.setattr(module, "pynndescent", lambda d, n_neighbors, **kw:
                        exact(d, n_neighbors))
    assert scib_metrics.kbet_per_label(graph, batches, labels) == pytest.approx(score)


def test_silhouettes_by_matrix_products_inside_scib_only(monkeypatch):
    """Inside the block scib's silhouettes take their distances from matrix products (also
    far from the origin, where uncentred float32 products would cancel), give the scores the
    pairwise form gives, and scib is left as it was after."""
    import scib_metrics
    from scib_metrics.utils import _silhouette
    from scipy.spatial.distance import cdist

    from spamask_integrate import metrics

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(240, 40)) + 500.0).astype(np.float32)  # far from the origin
    d = np.asarray(metrics._matmul_cdist(x[:50], x))
    assert np.abs(d - cdist(x[:50].astype(np.float64), x)).max() < 1e-4
    assert (np.diag(d[:, :50]) == 0).all()  # a spot and itself: 0, not sqrt(rounding)
    labels = np.repeat(["u", "v", "w"], 80)
    x[labels == "v"] += 1.5
    batches = np.tile(["a", "b"], 120)
    stock = _silhouette.cdist
    pairwise = (scib_metrics.silhouette_label(x, labels),
                scib_metrics.silhouette_batch(x, labels, batches))
    calls = []
    matmul = metrics._matmul_cdist

    def spy(a, b):
        calls.append(a.shape)
        return matmul(a, b)

    monkeypatch.setattr(metrics, "_matmul_cdist", spy)
    with metrics._matmul_silhouette_distances():
        fast = (scib_metrics.silhouette_label(x, labels),
                scib_metrics.silhouette_batch(x, labels, batches))
    assert calls  # the silhouettes went through the matrix-product distances
    assert fast == pytest.approx(pairwise, abs=1e-5)
    assert 0.55 < fast[0] < 0.7  # "v" is apart: the score is not a constant
    assert _silhouette.cdist is stock
