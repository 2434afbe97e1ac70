"""Slice-sharded runs: the plan, per-rank reading, preprocessing across ranks, and whole runs
with two gloo processes through the real torchrun launcher."""

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

import spamask_integrate as si
from conftest import DLPFC, requires_dlpfc, write_h5ad_slices
from spamask_integrate import io as sio
from spamask_integrate.errors import ConfigError, InputError
from spamask_integrate.shard import Collective, plan_shards, read_shard

PRE = {"n_top_genes": 60, "n_comps": 20, "min_cells": 5}


@pytest.fixture
def four_files(tmp_path):
    """Four synthetic slices of one tissue (3 planted domains), of different sizes (random
    spots kept of each), as h5ad files."""
    whole = si.datasets.synthetic_slices(4, 400, 120, 3, batch_effect=0.3, noise=0.8,
                                         marker_fold=2.0, seed=0)
    rng = np.random.default_rng(0)
    keep = np.zeros(whole.n_obs, dtype=bool)
    for name, n in zip(whole.obs["slice"].cat.categories, (400, 150, 250, 200)):
        idx = np.flatnonzero(whole.obs["slice"] == name)
        keep[np.sort(rng.choice(idx, n, replace=False))] = True
    whole = whole[keep].copy()
    whole.obs["slice"] = whole.obs["slice"].cat.rename_categories(["s0", "s1", "s2", "s3"])
    return write_h5ad_slices(whole, tmp_path)


def test_plan_balances_spots_and_reads_no_counts(four_files, monkeypatch):
    monkeypatch.setattr(sio, "_read_one", lambda *a, **k: pytest.fail("read the counts"))
    plan = plan_shards([str(p) for p in four_files], 2)
    assert [p.source.name for p in plan] == ["s0", "s1", "s2", "s3"]  # input order
    assert [p.n_spots for p in plan] == [400, 150, 250, 200]
    assert [p.rank for p in plan] == [0, 0, 1, 1]  # largest first: 400 + 150 | 250 + 200
    with pytest.raises(ConfigError, match="4 slices for 5 ranks"):
        plan_shards([str(p) for p in four_files], 5)
    with pytest.raises(InputError, match="duplicated slice name.*s0"):
        plan_shards([str(four_files[0]), str(four_files[0])], 2)


def test_atlas_file_plans_and_reads_only_the_ranks_rows(tmp_path):
    atlas = si.datasets.synthetic_slices(3, 100, 40, 3, seed=0)
    atlas.obs["sample"] = atlas.obs.pop("slice").astype(str)
    atlas.obs_names = [f"c{i}" for i in range(atlas.n_obs)]
    atlas.X = atlas.layers.pop("counts") if "counts" in atlas.layers else atlas.X
    path = tmp_path / "atlas.h5ad"
    atlas.write_h5ad(path)
    plan = plan_shards([str(path)], 2, slice_column="sample")
    assert [(p.source.name, p.n_spots) for p in plan] == [
        ("slice0", 100), ("slice1", 100), ("slice2", 100)]
    class Rank1(Collective):  # rank 0 holds slice0 and the atlas's genes
        def allgather(self, obj):
            return [list(atlas.var_names), obj]

    rank1 = read_shard(plan, 1, Rank1(), min_spots=7)
    assert set(rank1.obs["slice"]) == {p.source.name for p in plan if p.rank == 1}
    assert list(rank1.obs["slice"].cat.categories) == ["slice0", "slice1", "slice2"]
    whole = si.read_slices([str(path)], slice_column="sample")  # the same rows, read whole
    rows = whole[whole.obs["slice"].isin(set(rank1.obs["slice"]))]
    assert list(rank1.obs_names) == list(rows.obs_names)
    assert (rank1.X != rows.X).nnz == 0
    np.testing.assert_array_equal(rank1.obsm["spatial"], rows.obsm["spatial"])
    with pytest.raises(InputError, match=r"atlas.h5ad: slice column obs\['donor'\] not found"):
        plan_shards([str(path)], 2, slice_column="donor")


def test_read_shard_opens_only_its_files_and_keeps_the_global_gene_order(four_files,
                                                                            monkeypatch):
    # the slices list their genes in different orders and s2 lacks one: a single process keeps
    # the genes of all slices in the first slice's order, and so must every rank
    for i, path in enumerate(four_files):
        a = ad.read_h5ad(path)
        a = a[:, a.var_names[::-1] if i % 2 else a.var_names].copy()
        if i == 2:
            a = a[:, a.var_names != a.var_names[0]].copy()
        a.write_h5ad(path)
    plan = plan_shards([str(p) for p in four_files], 2)
    assert [p.rank for p in plan] == [0, 0, 1, 1]
    rank0_genes = list(si.read_slices([str(p) for p in four_files[:2]]).var_names)

    class Rank1(Collective):  # what rank 1 receives from its allgathers: rank 0 holds s0, s1
        def allgather(self, obj):
            return [rank0_genes, obj]

    opened = []
    real = sio._read_one
    monkeypatch.setattr(sio, "_read_one", lambda src, rows=None: opened.append(src.name)
                        or real(src, rows))
    mine = read_shard(plan, 1, Rank1(), min_spots=7)
    assert opened == ["s2", "s3"]  # rank 1's files, never rank 0's
    single = si.read_slices([str(p) for p in four_files])
    assert list(mine.var_names) == list(single.var_names)
    rows = single[single.obs["slice"].isin(["s2", "s3"])]
    assert list(mine.obs_names) == list(rows.obs_names)
    assert (mine.X != rows.X).nnz == 0


def test_hvgs_per_slice_equal_scanpy_batch_mode(four_files):
    import scanpy as sc

    a = si.read_slices([str(p) for p in four_files])
    b = a.copy()
    sc.pp.highly_variable_genes(b, layer="counts", flavor="seurat_v3", n_top_genes=50,
                                batch_key="slice")
    from spamask_integrate.preprocess import _select_hvgs

    hvg = _select_hvgs(a, "slice", 50)
    assert hvg.sum() == 50
    assert np.array_equal(hvg, b.var["highly_variable"].to_numpy())
    for column in ("highly_variable_rank", "highly_variable_nbatches", "variances_norm"):
        np.testing.assert_array_equal(a.var[column].to_numpy(), b.var[column].to_numpy())


def _config(**kw):
    return si.SpamaskConfig(**{"epochs": 30, "hidden_dim": 32, "latent_dim": 16,
                               "edge_decoder_hidden": 32, "quiet": True, "seed": 3,
                               "device": "cpu", **kw})


def test_two_ranks_preprocess_like_one_process_and_find_the_domains(four_files):
    sources = [str(p) for p in four_files]
    sharded = si.run(sources, None, label_key="ground_truth", n_domains=3, k=6, config=_config(),
                     scib=False, preprocess_kwargs=PRE, nproc=2, shard_slices=True)
    shard = sharded.uns["spamask"]["shard"]
    assert {r: list(v) for r, v in shard["slices"].items()} == {"0": ["s0", "s1"],
                                                              "1": ["s2", "s3"]}
    assert {r: int(v) for r, v in shard["spots"].items()} == {"0": 550, "1": 450}
    single = si.read_slices(sources, label_key="ground_truth")
    si.preprocess(single, **PRE)
    # the same spots in the same order, the same genes, the same PCA up to float rounding
    assert list(sharded.obs_names) == list(single.obs_names)
    assert np.array_equal(sharded.var["highly_variable"], single.var["highly_variable"])
    pca = single.obsm["X_pca"]
    np.testing.assert_allclose(sharded.obsm["X_pca"], pca, atol=1e-5 * np.abs(pca).max())
    si.build_graph(single, k=6)
    assert (sharded.obsp["spamask_connectivities"] != single.obsp["spamask_connectivities"]).nnz == 0
    assert sharded.obsm["X_spamask"].shape == (1000, 16)  # latent 16 < 30: not reduced
    assert sharded.uns["spamask"]["train"]["mode"] == "full-graph-sharded"
    alone = si.run(sources, None, label_key="ground_truth", n_domains=3, k=6, config=_config(),
                   scib=False, preprocess_kwargs=PRE)
    for name in ("s0", "s1", "s2", "s3"):  # planted domains recovered on every slice, by both
        for result in (sharded, alone):
            part = result.obs[result.obs["slice"] == name]
            assert adjusted_rand_score(part["ground_truth"], part["domain"]) > 0.6, name


def test_uneven_subgraph_shards_take_equal_steps(four_files, tmp_path):
    # three slices on two ranks (400 | 250 + 200): tile groups differ per rank; a rank that
    # stepped less often would leave the other waiting for its gradient forever
    from click.testing import CliRunner

    from cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 2, hidden_dim: 32, latent_dim: 16, edge_decoder_hidden: 32,"
                   " minibatch: true, subgraph_size: 100, subgraph_tile_size: 25}\n"
                   f"preprocess: {json.dumps(PRE)}\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["-q", "run", *map(str, (four_files[0], *four_files[2:])),
                                    "-o", str(out), "--config", str(cfg), "--k", "6",
                                    "--no-scib", "--no-report", "--nproc", "2",
                                    "--shard-slices", "--n-domains", "3"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads((out / "run.json").read_text())
    assert info["params"]["shard_slices"] is True and info["n_spots"] == 850
    result = ad.read_h5ad(out / "integrated.h5ad")
    assert result.uns["spamask"]["train"]["mode"] == "subgraph-sharded"
    assert len(result.uns["spamask"]["train"]["loss"]) == 2
    assert result.X is None and sp.issparse(result.obsp["spamask_connectivities"])


def test_a_rank_with_a_bad_slice_fails_the_run_with_its_message(four_files, tmp_path):
    bad = ad.read_h5ad(four_files[3])
    del bad.obsm["spatial"]
    bad.write_h5ad(four_files[3])
    with pytest.raises(InputError, match=r"s3.h5ad \(slice 's3'\): obsm\['spatial'\] is missing"
                                         r".*\(rank 1 of the sharded run\)"):
        si.run([str(p) for p in four_files], tmp_path / "out", n_domains=3, k=6,
               config=_config(epochs=1), scib=False, preprocess_kwargs=PRE, nproc=2,
               shard_slices=True)
    assert not (tmp_path / "out" / "integrated.h5ad").exists()


def test_shard_slices_needs_files():
    adata = si.datasets.synthetic_slices(2, 50, 30, 2, seed=0)
    with pytest.raises(ConfigError, match="reads its slices from files"):
        si.run(adata, None, shard_slices=True, nproc=2)


def test_sharded_checkpoint_resumes(four_files, tmp_path):
    sources, ck = [str(p) for p in four_files], tmp_path / "checkpoint.pt"
    kw = dict(n_domains=3, k=6, scib=False, preprocess_kwargs=PRE, nproc=2, shard_slices=True,
              checkpoint=ck, checkpoint_every=1)
    first = si.run(sources, None, config=_config(epochs=2), **kw)
    assert ck.exists()
    again = si.run(sources, None, config=_config(epochs=3), resume=True, **kw)
    loss = again.uns["spamask"]["train"]["loss"]
    assert len(loss) == 3  # epochs 1-2 from the checkpoint, epoch 3 trained now
    np.testing.assert_array_equal(loss[:2], first.uns["spamask"]["train"]["loss"])


@pytest.mark.parametrize("form", ["csr", "csc", "dense"])
def test_rows_are_read_from_the_file_in_any_storage(tmp_path, form):
    import h5py

    x = sp.random(12, 5, density=0.5, format="csr", random_state=0, dtype=np.float32)
    stored = {"csr": x, "csc": x.tocsc(), "dense": x.toarray()}[form]
    ad.AnnData(stored).write_h5ad(tmp_path / "m.h5ad")
    rows = np.array([0, 1, 5, 6, 7, 11])
    with h5py.File(tmp_path / "m.h5ad", "r") as f:
        got = sio._rows_of(f["X"], rows)
    np.testing.assert_array_equal(np.asarray(got.todense() if sp.issparse(got) else got),
                                  x[rows].toarray())


def test_shared_pca_in_blocks_equals_pca():
    """The gathered 30-d embedding of a sharded run: blocks of rows give sklearn's PCA scores
    (up to each component's sign)."""
    from sklearn.decomposition import PCA

    from spamask_integrate.distributed import _shared_pca
    from spamask_integrate.shard import Collective

    x = np.random.default_rng(0).normal(size=(1000, 40)).astype(np.float32)
    x[:, :5] *= 10  # distinct leading variances
    got = _shared_pca(x, Collective(), 8, block=97)
    want = PCA(8, svd_solver="full").fit_transform(x.astype(np.float64))
    assert got.shape == (1000, 8) and got.dtype == np.float32
    np.testing.assert_allclose(np.abs(got), np.abs(want), atol=1e-3)
    np.testing.assert_array_equal(_shared_pca(x[:, :6], Collective(), 8), x[:, :6])


@requires_dlpfc
def test_sharded_dlpfc_finds_the_domains_of_one_process():
    """The four shared DLPFC slices, 2 sharded ranks against one process (the default model,
    60 epochs to keep CI short): both recover the layers on every slice, and their domains
    agree far beyond chance (150 epochs, 5 seeds: 0.88-0.94 between the two,
    benchmarks/README.md)."""
    sources = [str(p) for p in sorted(DLPFC.glob("*.h5ad"))]
    config = si.SpamaskConfig(epochs=60, quiet=True, seed=0, device="cpu")
    runs = [si.run(sources, None, label_key="layer", n_domains=7, config=config, scib=False,
                   nproc=nproc, shard_slices=nproc > 1) for nproc in (2, 1)]
    sharded, alone = runs
    assert list(sharded.obs_names) == list(alone.obs_names)
    for result in runs:
        per_slice = [adjusted_rand_score(part["layer"], part["domain"])
                     for _, part in result.obs.groupby("slice", observed=True)]
        assert len(per_slice) == 4 and min(per_slice) > 0.4, per_slice
        assert np.mean(per_slice) > 0.5, per_slice
    assert adjusted_rand_score(sharded.obs["domain"], alone.obs["domain"]) > 0.7
