import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spamask_integrate as si

FAST = dict(epochs=15, hidden_dim=32, latent_dim=16, edge_decoder_hidden=32)
PREP = dict(n_top_genes=None, n_comps=20, min_cells=5)
FILES = {"domains.csv", "metrics.csv", "metrics.json", "spatial_domains.png", "umap.png",
         "scores.png", "integrated.h5ad", "report.html"}


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


def test_run_splits_an_anndata_by_its_slice_column(tiny_slices):
    """run() on one AnnData with a sample column: the same slices as read_slices would make,
    and the same one-line errors naming the column."""
    atlas = tiny_slices.copy()
    atlas.obs["sample"] = atlas.obs["slice"].astype(str).map({"slice0": "b", "slice1": "a"})
    del atlas.obs["slice"]
    with pytest.raises(si.InputError, match=r"the AnnData given: slice column "
                                            r"obs\['donor'\] not found"):
        si.run(atlas.copy(), None, slice_column="donor", scib=False, **FAST)
    holes = atlas.copy()
    holes.obs.loc[holes.obs_names[:3], "sample"] = None
    with pytest.raises(si.InputError, match=r"obs\['sample'\] is empty for 3 spots"):
        si.run(holes, None, slice_column="sample", scib=False, **FAST)
    out = si.run(atlas, None, label_key="ground_truth", n_domains=4, k=6, slice_column="sample",
                 preprocess_kwargs=PREP, scib=False, **FAST)
    assert list(out.obs["slice"].cat.categories) == ["b", "a"]  # order of appearance
    assert (out.obs["slice"].astype(str) == out.obs["sample"]).all()


BUSY = """
import numpy as np
a = np.random.default_rng(0).random((600, 600))
while True:
    a = a @ a
    a /= np.abs(a).max()
"""


def test_same_seed_same_domains_while_the_cpu_is_busy():
    """Two runs with one seed agree bit for bit (embedding) and spot for spot (domains, also
    with 2 K components always joined) with 2 threads while another process keeps a core busy: no kernel
    may sum in an order that depends on thread timing."""
    import os
    import subprocess
    import sys

    import torch

    assert torch.get_num_threads() == 2  # conftest: the thread count users run
    data = si.datasets.synthetic_slices(2, 2500, 120, 5, seed=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
    try:
        runs = [si.run(data.copy(), None, label_key="ground_truth", n_domains=5, k=6,
                       preprocess_kwargs=PREP, scib=False, seed=11, **{**FAST, "epochs": 30})
                for _ in range(2)]
        for out in runs:  # and the opt-in merge of more components, also under load
            si.cluster(out, 5, n_components=10, key_added="merged", seed=11)
        assert busy.poll() is None  # the CPU stayed busy throughout
    finally:
        busy.kill()
        busy.wait()
    first, second = runs
    assert np.array_equal(first.obsm["X_spamask"], second.obsm["X_spamask"])
    assert np.array_equal(first.obsm["X_spamask_harmony"], second.obsm["X_spamask_harmony"])
    assert (first.obs["domain"] == second.obs["domain"]).all()
    assert (first.obs["merged"] == second.obs["merged"]).all()
    joined = [out.uns["spamask"]["cluster"]["merged"] for out in runs]  # domain: components
    assert joined[0].keys() == joined[1].keys() and len(joined[0]) == 5
    assert all(np.array_equal(joined[0][g], joined[1][g]) for g in joined[0])


def test_several_models_train_in_one_process_only(tmp_path):
    with pytest.raises(si.ConfigError, match="n_models=2: several models train in one process"):
        si.run([tmp_path / "a.h5ad"], n_models=2, nproc=2)
    with pytest.raises(si.ConfigError, match="n_models=2"):
        si.run([tmp_path / "a.h5ad"], n_models=2, shard_slices=True)
