"""Benchmark plans: variants (ablations), SpaMask per slice, one training per seed."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest

import spamask_integrate as si
from spamask_integrate.benchmark import combinations, load_plan, run_plan

from conftest import write_h5ad_slices

TRAIN = "{epochs: 30, hidden_dim: 32, latent_dim: 16, edge_decoder_hidden: 32}"


def _plan(tmp_path, paths, settings: str):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
datasets:
  - name: tiny
    sources: [{paths[0]}, {paths[1]}]
    label_key: ground_truth
    n_domains: 4
    k: 6
settings:
  preprocess: {{n_top_genes: null, n_comps: 20, min_cells: 5}}
  train: {TRAIN}
{settings}
""")
    return plan


def test_variants_and_per_slice(tiny_slices, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    paths = write_h5ad_slices(tiny_slices, folder)
    plan = _plan(tmp_path, paths, """
  methods: [pca, spamask, spamask_per_slice]
  harmony: [true, false]
  seeds: [0]
  variants:
    default: {}
    k_4: {k: 4, train: {lam: 0}}
""")
    combos = combinations(load_plan(plan))
    # 2 variants x (2 Harmony settings for pca and joint + 1 for per slice: nothing to align)
    assert len(combos) == 10
    assert not [c for c in combos if c.method == "spamask_per_slice" and c.harmony]
    # count the trainings: the joint model must be trained once per seed and variant
    train_module = importlib.import_module("spamask_integrate.train")
    trained = []
    real_train = train_module.train

    def counting_train(adata, *args, **kwargs):
        trained.append(adata.n_obs)
        return real_train(adata, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", counting_train)
    results = run_plan(plan, tmp_path / "out", progress=False)
    assert (results["status"] == "ok").all(), results[results.status != "ok"].error.tolist()
    ari = results[(results.metric == "ARI") & (results.scope != "all")]
    assert set(ari.variant) == {"default", "k_4"}
    per_slice = ari[ari.method == "spamask_per_slice"]
    assert len(per_slice) == 2 * 2  # every variant scores both slices
    # even this short training sees through the noise better than PCA + GMM
    mean = ari[ari.variant == "default"].groupby("method").value.mean()
    assert mean["spamask"] > mean["pca"] + 0.1
    assert mean["spamask_per_slice"] > mean["pca"] + 0.1
    # Harmony on/off share one joint training (all 600 spots) per variant; per slice
    # trains each 300-spot slice once per variant
    assert sorted(trained) == [300] * 4 + [600] * 2
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| tiny | spamask_per_slice | k_4 |" in summary


def test_bad_variant_is_a_config_error(tmp_path):
    plan = _plan(tmp_path, ["a.h5ad", "b.h5ad"], """
  variants:
    odd: {epochs: 5}
""")
    with pytest.raises(si.ConfigError, match="variant 'odd' may only set train, preprocess, k, refine"):
        load_plan(plan)


def test_variant_overrides_merge_over_the_plan_settings(tmp_path):
    from spamask_integrate.benchmark import _options

    plan = load_plan(_plan(tmp_path, ["a.h5ad", "b.h5ad"], """
  refine: false
  variants:
    default: {}
    refined: {refine: true, train: {mask_rate: 0.3}, k: 9}
"""))
    ds = plan["datasets"][0]
    pre, train, k, refine = _options(plan, ds, "default")
    assert (k, refine, train["epochs"]) == (6, False, 30) and "mask_rate" not in train
    pre, train, k, refine = _options(plan, ds, "refined")
    # the variant wins field by field; the plan's other training settings stay
    assert (k, refine, train["mask_rate"], train["epochs"]) == (9, True, 0.3, 30)
    assert pre == {"n_top_genes": None, "n_comps": 20, "min_cells": 5}


def test_variant_sets_the_callers_components_for_every_method(tiny_slices, tmp_path,
                                                              monkeypatch):
    import importlib

    module = importlib.import_module("spamask_integrate.cluster")
    real, seen = module.cluster, []

    def spy(adata, *args, **kwargs):
        seen.append(kwargs.get("n_components"))
        return real(adata, *args, **kwargs)

    monkeypatch.setattr(module, "cluster", spy)
    folder = tmp_path / "data"
    folder.mkdir()
    paths = write_h5ad_slices(tiny_slices, folder)
    plan = _plan(tmp_path, paths, """
  methods: [pca, smoothed_pca]
  harmony: [false]
  seeds: [0]
  variants:
    default: {}
    merged_from_8: {n_components: 8}
    k_components: {n_components: null}
""")
    results = run_plan(plan, tmp_path / "out", progress=False)
    assert (results["status"] == "ok").all(), results[results.status != "ok"].error.tolist()
    # the default (no setting) is "auto"; null asks for K components, no merge
    assert sorted(seen, key=str) == [8, 8, None, None, "auto", "auto"]


def test_results_from_before_variants_are_read_as_default(tmp_path):
    from spamask_integrate.benchmark import _read_results

    old = tmp_path / "results.csv"
    pd.DataFrame([{"dataset": "d", "method": "pca", "harmony": False, "cluster": "gmm",
                   "seed": 0, "status": "ok", "error": "", "seconds": 1.0, "kind": "domain",
                   "scope": "s1", "embedding": "", "metric": "ARI", "value": 0.5}]).to_csv(
        old, index=False)
    table = _read_results(old)
    assert table["variant"].tolist() == ["default"]
    assert list(table.columns[:3]) == ["dataset", "method", "variant"]


def test_peers_run_beside_the_other_methods(tiny_slices, tmp_path):
    pytest.importorskip("banksy", reason="the BANKSY peer needs the 'peers' extra (pybanksy)")
    pytest.importorskip("GraphST", reason="the GraphST peer needs the 'peers' extra")
    folder = tmp_path / "data"
    folder.mkdir()
    paths = write_h5ad_slices(tiny_slices, folder)
    plan = _plan(tmp_path, paths, """
  methods: [pca, banksy_0.8, graphst]
  harmony: [true]
  seeds: [0]
""")
    results = run_plan(plan, tmp_path / "out", progress=False)
    assert (results["status"] == "ok").all(), results[results.status != "ok"].error.tolist()
    ari = results[(results.metric == "ARI") & (results.scope != "all")]
    mean = ari.groupby("method").value.mean()
    assert set(mean.index) == {"pca", "banksy_0.8", "graphst"}
    assert mean["banksy_0.8"] > mean["pca"] + 0.2  # its neighbourhood features do their job


def test_unknown_peer_is_a_config_error(tmp_path):
    plan = _plan(tmp_path, ["a.h5ad", "b.h5ad"], """
  methods: [spamask, banksy_2]
""")
    with pytest.raises(si.ConfigError, match="unknown method.*banksy_2"):
        load_plan(plan)


def test_spamask_rows_are_what_run_gives(tiny_slices, tmp_path):
    """The harness clusters what run() clusters (the context beside the embedding, after
    Harmony) and scib scores what run() scores (the Harmony-corrected embedding)."""
    folder = tmp_path / "data"
    folder.mkdir()
    paths = write_h5ad_slices(tiny_slices, folder)
    plan = _plan(tmp_path, paths, """
  methods: [spamask]
  harmony: [true]
  seeds: [2]
  scib: true
  scib_max_spots: 300
""")
    results = run_plan(plan, tmp_path / "out", progress=False)
    assert (results["status"] == "ok").all(), results[results.status != "ok"].error.tolist()
    adata = si.run([str(p) for p in paths], None, label_key="ground_truth", n_domains=4, k=6,
                   preprocess_kwargs=dict(n_top_genes=None, n_comps=20, min_cells=5),
                   scib=True, scib_max_spots=300, seed=2, epochs=30, hidden_dim=32,
                   latent_dim=16, edge_decoder_hidden=32)
    assert adata.uns["spamask"]["cluster"]["use_rep"] == "X_spamask_context_harmony"
    ran = si.metrics_table(adata)

    def values(table, kind, embedding):
        rows = table[(table["kind"] == kind) & (table["embedding"] == embedding)]
        return rows.set_index(["scope", "metric"])["value"].astype(float).sort_index()

    domains = values(results, "domain", "")
    assert len(domains) and domains.equals(values(ran, "domain", ""))
    scib = values(results, "integration", "embedding")
    assert len(scib) > 5
    pd.testing.assert_series_equal(scib, values(ran, "integration", "X_spamask_harmony"))
