"""Tile subgraphs: groups, halos, and the loss of a core against the full graph."""

import dgl
import numpy as np
import pytest
import torch

import spamask_integrate as si
from spamask_integrate.graph import spatial_tiles
from spamask_integrate.model import SpaMaskModule
from spamask_integrate.sampling import EdgeMasker, NegativeSampler, TileSubgraphs
from spamask_integrate.train import gcn_norms, training_epochs
from spamask_integrate.utils import batch_codes


def _tiles(adata, size):
    return spatial_tiles(np.asarray(adata.obsm["spatial"]), batch_codes(adata, "slice"), size)


def test_groups_cover_every_spot_once_and_follow_the_seed(tiny_prepped):
    adata, g = tiny_prepped
    tiles = _tiles(adata, 25)
    subs = TileSubgraphs(g, tiles, group_size=100, halo=3)
    groups = subs.groups(torch.Generator().manual_seed(0))
    assert len(groups) == -(-adata.n_obs // 100)
    allnodes = torch.cat(groups)
    assert torch.equal(torch.sort(allnodes).values, torch.arange(adata.n_obs))
    for core in groups:  # whole tiles only
        t = tiles[core.numpy()]
        assert all((tiles == u).sum() == (t == u).sum() for u in np.unique(t))
    again = subs.groups(torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(groups, again))
    other = subs.groups(torch.Generator().manual_seed(1))
    assert not all(torch.equal(a, b) for a, b in zip(groups, other))
    assert len(subs.groups(torch.Generator().manual_seed(0), multiple_of=4)) % 4 == 0


@pytest.mark.parametrize("halo", [0, 1, 3])
def test_halo_is_the_k_hop_neighbourhood(tiny_prepped, halo):
    adata, g = tiny_prepped
    subs = TileSubgraphs(g, _tiles(adata, 25), group_size=60, halo=halo)
    core = subs.groups(torch.Generator().manual_seed(3))[0]
    expected = dgl.khop_in_subgraph(g, core, k=halo)[0].ndata[dgl.NID] if halo else core
    assert torch.equal(subs.nodes_around(core), torch.sort(expected).values)
    sub, _, nid, is_core = subs.subgraph(core)
    assert sub.num_nodes() == nid.numel() and torch.equal(nid[is_core], core)


def _losses(module, g, kept, x, masked, core, pos, neg, halo):
    """(full-graph losses of the core, subgraph losses of the same core)."""
    n = g.num_nodes()
    w, wk = gcn_norms(g), gcn_norms(kept)
    in_core = torch.zeros(n, dtype=torch.bool)
    in_core[core] = True
    full = module(
        dict(enc_graphs=[g, g], enc_weights=[w, w], dec_graph=g, dec_weight=w, x_in=x,
             masked_in=masked, masked_mid=masked, x_target=x, masked_out=masked & in_core,
             alpha=2.0),
        dict(enc_graphs=[kept, kept], enc_weights=[wk, wk], x_in=x, pos=pos, neg=neg))
    subs = TileSubgraphs(g, torch.zeros(n, dtype=torch.int64), group_size=n, halo=halo)
    sub, kept_sub, nid, is_core = subs.subgraph(core, kept)
    ws = gcn_norms(sub, g.in_degrees()[nid])
    wks = gcn_norms(kept_sub, kept.in_degrees()[nid])
    local = lambda p: torch.searchsorted(nid, p)  # noqa: E731
    part = module(
        dict(enc_graphs=[sub, sub], enc_weights=[ws, ws], dec_graph=sub, dec_weight=ws,
             x_in=x[nid], masked_in=masked[nid], masked_mid=masked[nid], x_target=x[nid],
             masked_out=masked[nid] & is_core, alpha=2.0),
        dict(enc_graphs=[kept_sub, kept_sub], enc_weights=[wks, wks], x_in=x[nid],
             pos=local(pos), neg=local(neg)))
    return [float(v) for v in full], [float(v) for v in part]


def test_subgraph_loss_equals_the_full_graph_when_the_halo_covers_the_receptive_field(
        tiny_prepped):
    adata, g = tiny_prepped
    x = torch.from_numpy(adata.obsm["X_pca"]).float()
    torch.manual_seed(0)
    module = SpaMaskModule(x.shape[1], 32, 16, edge_decoder_hidden=32).eval()
    n = g.num_nodes()
    masked = torch.rand(n) < 0.3
    kept, pos = EdgeMasker(g, "undirected", 0.2).draw()
    tiles = _tiles(adata, 40)
    core = torch.from_numpy(np.flatnonzero(np.isin(tiles, [0, 5, 9])))
    pos = pos[:, torch.isin(pos[0], core)]
    neg = NegativeSampler(g, g.ndata["slice"], candidates=core)(pos[0])
    assert pos.shape[1] > 10 and bool(torch.isin(neg[1], core).all())
    full, exact = _losses(module, g, kept, x, masked, core, pos, neg, halo=3)
    assert np.allclose(full, exact, rtol=1e-5, atol=1e-6)
    _, short = _losses(module, g, kept, x, masked, core, pos, neg, halo=1)
    assert not np.isclose(full[0], short[0], rtol=1e-4)  # a short halo changes the loss


def test_subgraph_training_is_seeded_and_learns(tiny_prepped):
    adata, g = tiny_prepped
    fast = dict(epochs=15, hidden_dim=32, latent_dim=16, edge_decoder_hidden=32, quiet=True,
                minibatch=True, sampler="subgraph", subgraph_size=150, subgraph_tile_size=30)
    model = si.train(adata, g, seed=4, key_added="sg", **fast)
    assert adata.uns["spamask"]["train"]["mode"] == "subgraph"
    loss = model.history["loss"]
    assert np.isfinite(loss).all() and np.mean(loss[-3:]) < np.mean(loss[:3])
    si.train(adata, g, seed=4, key_added="sg2", **fast)
    assert np.array_equal(adata.obsm["sg"], adata.obsm["sg2"])


def test_auto_epochs_budget():
    c = si.SpamaskConfig()
    assert c.epochs == "auto"
    assert training_epochs(c, 11_380, minibatch=False) == 100  # the DLPFC slices
    assert training_epochs(c, 1_000_000, minibatch=True) == 3  # 150 steps of 16,384 spots
    assert training_epochs(c, 100_000, minibatch=True) == 25
    assert training_epochs(c, 100_000, minibatch=False) == 17  # 100 x 16,384 spot visits
    assert training_epochs(c.replace(epochs=7), 1_000_000, minibatch=True) == 7
    assert training_epochs(c.replace(budget_steps=10, subgraph_size=100), 1_000, True) == 1
    with pytest.raises(si.errors.ConfigError, match="epochs"):
        c.replace(epochs="many")


def test_auto_epochs_recorded(tiny_prepped):
    adata, g = tiny_prepped
    si.train(adata, g, full_graph_epochs=3, hidden_dim=16, latent_dim=8, edge_decoder_hidden=16,
             quiet=True, seed=0)
    info = adata.uns["spamask"]["train"]
    assert info["epochs"] == 3 and info["epochs_run"] == 3 and info["config"]["epochs"] == "auto"


def test_larger_graphs_train_on_tile_subgraphs_by_default(tiny_prepped):
    adata, g = tiny_prepped
    small = dict(epochs=1, hidden_dim=16, latent_dim=8, edge_decoder_hidden=16, quiet=True)
    si.train(adata, g, **small)  # 600 spots: one step holds the whole graph
    assert adata.uns["spamask"]["train"]["mode"] == "full-graph"
    si.train(adata, g, minibatch_threshold=500, subgraph_size=200, subgraph_tile_size=50,
             **small)
    assert adata.uns["spamask"]["train"]["mode"] == "subgraph"
