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
