"""What a scanpy user does next with a run's result, at a size where it used to break.

Above 4,096 cells scanpy's ``sc.pp.neighbors`` hands the kNN search to pynndescent's
transformer; pynndescent 0.7.0 returns sparse *arrays* there and scanpy 1.11.5 crashes on them.
These tests run that path on 12,000 spots in the environment ``pip install -e ".[test]"``
resolves, so a dependency release that breaks the workflow fails CI instead of a user.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from sklearn.metrics import homogeneity_score

import spamask_integrate as si
from cli.main import main

from conftest import write_h5ad_slices

N_SLICES, PER_SLICE, N_DOMAINS = 4, 3000, 5


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """``spamask-integrate run`` on 4 synthetic slices of 3,000 spots: (OUT, marker table).

    Default settings except a smaller network and 20 epochs, to keep CI short. The data are
    the generator's defaults, whose domains every seed recovers (ARI 0.954-0.965 for seeds
    0-4): this test is about what scanpy does with a result, not about accuracy.
    """
    adata = si.datasets.synthetic_slices(N_SLICES, PER_SLICE, 200, N_DOMAINS, seed=0)
    folder = tmp_path_factory.mktemp("slices")
    paths = write_h5ad_slices(adata, folder)
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {
        "epochs": 20, "hidden_dim": 64, "latent_dim": 32, "edge_decoder_hidden": 64}}))
    out = tmp_path_factory.mktemp("run") / "out"
    result = CliRunner().invoke(main, [
        "-q", "run", *map(str, paths), "-o", str(out), "--label-key", "ground_truth",
        "--n-domains", str(N_DOMAINS), "--k", "6", "--no-scib", "--seed", "0",
        "--config", str(params)])
    assert result.exit_code == 0, result.output
    return out, adata.var["marker_of"]


def test_scanpy_next_steps_on_integrated_h5ad(finished_run):
    import scanpy as sc
    from matplotlib import pyplot as plt

    out, marker_of = finished_run
    adata = ad.read_h5ad(out / "integrated.h5ad")
    n = adata.n_obs
    assert n == N_SLICES * PER_SLICE >= 12_000
    metrics = pd.read_csv(out / "metrics.csv")
    ari = metrics.query("kind == 'domain' and scope == 'all' and metric == 'ARI'").value.item()
    assert ari > 0.9  # the domains are real, so the checks below have something to find

    sc.pp.neighbors(adata, use_rep="X_spamask_harmony")  # pynndescent above 4,096 cells
    assert adata.obsp["connectivities"].shape == (n, n)
    assert np.diff(adata.obsp["distances"].indptr).min() >= 14  # every spot: 15 incl. self

    sc.tl.umap(adata)
    assert adata.obsm["X_umap"].shape == (n, 2) and np.isfinite(adata.obsm["X_umap"]).all()

    sc.tl.leiden(adata, flavor="igraph", n_iterations=2)
    assert adata.obs["leiden"].nunique() >= N_DOMAINS
    # leiden splits finer than the K domains, but its clusters sit inside them
    assert homogeneity_score(adata.obs["domain"], adata.obs["leiden"]) > 0.8

    sc.tl.rank_genes_groups(adata, "domain")
    table = sc.get.rank_genes_groups_df(adata, None)
    assert np.isfinite(table["logfoldchanges"]).all()  # X is log-normalised, as scanpy expects
    truth = pd.crosstab(adata.obs["domain"], adata.obs["ground_truth"]).idxmax(axis=1)
    for domain, genes in table.groupby("group", observed=True):
        top = genes.nlargest(10, "scores")
        hits = (marker_of.loc[top["names"]].astype(str) == truth[domain]).sum()
        assert hits >= 8, f"domain {domain}: {hits}/10 top genes mark {truth[domain]}"
        assert (top["logfoldchanges"] > 0.5).all()

    fig = sc.pl.embedding(adata, basis="spatial", color="domain", show=False, return_fig=True)
    try:
        assert sum(len(c.get_offsets()) for ax in fig.axes for c in ax.collections) == n
    finally:
        plt.close(fig)


def test_run_figures_and_scib_neighbours_at_the_same_size(finished_run):
    """The other places pynndescent and sparse matrices meet our results: the run's own
    umap.png (umap-learn's NNDescent), and scib-metrics' neighbour graph, both for our
    evaluate (exact kNN) and for a user calling scib-metrics' pynndescent helper."""
    from matplotlib.image import imread
    from scib_metrics.nearest_neighbors import pynndescent

    from spamask_integrate.metrics import _sklearn_neighbors

    out, _ = finished_run
    image = imread(out / "umap.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 0.05
    run = json.loads((out / "run.json").read_text())
    assert run["n_spots"] >= 12_000

    x = ad.read_h5ad(out / "integrated.h5ad").obsm["X_spamask_harmony"]
    exact = _sklearn_neighbors(x, 90)
    approx = pynndescent(x, 90, random_state=0, n_jobs=1)
    for result in (exact, approx):
        conn = result.knn_graph_connectivities
        assert conn.shape == (len(x), len(x)) and conn.nnz >= 90 * len(x)
        assert abs(conn - conn.T).max() < 1e-6  # fuzzy union: symmetric
    overlap = np.mean([len(np.intersect1d(a, b)) / 90
                       for a, b in zip(exact.indices[:500], approx.indices[:500])])
    assert overlap > 0.9
