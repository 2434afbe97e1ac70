"""Two CPU processes with gloo on the loopback address, through the real torchrun launcher."""

import numpy as np
import pytest
import torch

import spamask_integrate as si
from spamask_integrate.distributed import train_distributed


@pytest.mark.parametrize("sampler", ["subgraph", "neighbor"])
def test_two_processes_split_seeds_and_agree(tiny_prepped, tmp_path, sampler):
    adata, _ = tiny_prepped
    config = si.SpamaskConfig(epochs=3, hidden_dim=32, latent_dim=16, edge_decoder_hidden=32,
                              batch_size=64, tile_size=16, subgraph_size=100,
                              subgraph_tile_size=20, sampler=sampler, quiet=True, seed=1,
                              device="cpu")
    log = str(tmp_path / "seeds")
    model = train_distributed(adata, "slice", config, nproc=2, workdir=tmp_path,
                              seed_log_path=log)
    assert model is not None and len(model.history["loss"]) == 3
    logs = [torch.load(f"{log}.rank{r}") for r in (0, 1)]
    n = adata.n_obs
    for epoch in range(3):
        sets = [torch.cat([s for e, s in lg if e == epoch]).unique() for lg in logs]
        assert len(np.intersect1d(sets[0].numpy(), sets[1].numpy())) == 0  # disjoint
        assert len(torch.cat(sets).unique()) == n  # together every node
    params = [torch.load(f"{log}.params{r}") for r in (0, 1)]
    for key in params[0]:  # DDP averaged the gradients: every parameter is equal
        assert torch.equal(params[0][key], params[1][key]), key
    for key, value in model.module.named_parameters():  # the model file is rank 0's
        assert torch.equal(value.detach(), params[0][key])
    emb = model.embed(adata)
    assert emb.shape == (n, 16) and np.isfinite(emb).all()


def test_cli_run_with_two_processes(tiny_slices, tmp_path):
    from click.testing import CliRunner

    from cli.main import main
    from conftest import write_h5ad_slices

    paths = write_h5ad_slices(tiny_slices, tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {epochs: 2, hidden_dim: 32, latent_dim: 16, edge_decoder_hidden: 32,"
                   " batch_size: 128, tile_size: 16}\n"
                   "preprocess: {n_top_genes: null, n_comps: 20, min_cells: 5}\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["-q", "run", *map(str, paths), "-o", str(out), "--config",
                                    str(cfg), "--k", "6", "--no-scib", "--nproc", "2",
                                    "--n-domains", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    import json

    info = json.loads((out / "run.json").read_text())
    assert info["params"]["nproc"] == 2
    assert (out / "integrated.h5ad").exists() and not (out / "checkpoint.pt").exists()
