import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spamask_integrate as si

FAST = dict(epochs=15, hidden_dim=32, latent_dim=16, edge_decoder_hidden=32)
PREP = dict(n_top_genes=None, n_comps=20, min_cells=5)
FILES = {"domains.csv", "metrics.csv", "metrics.json", "spatial_domains.png", "umap.png",
         "scores.png", "integrated.h5ad"}


def test_run_writes_everything(tiny_slices, tmp_path):
    out = tmp_path / "out"
    adata = si.run(tiny_slices, out, label_key="ground_truth", n_domains=4, k=6,
                   preprocess_kwargs=PREP, scib=False, seed=3, **FAST)
    assert {p.name for p in out.iterdir()} == FILES
    res = ad.read_h5ad(out / "integrated.h5ad")
    assert {"slice", "domain", "ground_truth"} <= set(res.obs.columns)
    assert {"X_pca", "X_spamask", "X_spamask_harmony", "spatial"} <= set(res.obsm)
    assert res.obs["domain"].nunique() == 4
    run_info = res.uns["spamask"]["run"]
    assert {"read", "preprocess", "graph", "train", "integrate", "cluster",
            "evaluate"} <= set(run_info["seconds"])
    assert "write" in adata.uns["spamask"]["run"]["seconds"]  # known only after the file
    assert run_info["params"]["train"]["seed"] == 3
    domains = pd.read_csv(out / "domains.csv")
    assert list(domains.columns) == ["spot", "slice", "x", "y", "domain"]
    assert len(domains) == 600
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"ARI", "NMI", "neighbour_agreement"} <= set(metrics.metric)
    assert np.array_equal(adata.obs["domain"].to_numpy(), res.obs["domain"].to_numpy())


def test_failed_write_leaves_no_partial_files(tiny_slices, tmp_path, monkeypatch):
    from spamask_integrate import plot

    def boom(*args, **kwargs):
        raise RuntimeError("plotting crashed")

    monkeypatch.setattr(plot, "umap", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plotting crashed"):
        si.run(tiny_slices, out, label_key="ground_truth", n_domains=4, k=6,
               preprocess_kwargs=PREP, scib=False, **FAST)
    assert list(out.iterdir()) == []
