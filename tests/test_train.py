import dgl
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

import spamask_integrate as si
from spamask_integrate.model import PReLU, SpaMaskModule, _PReLUFunction, sce_loss
from spamask_integrate.sampling import EdgeMasker, NegativeSampler, rows_of
from spamask_integrate.train import gcn_norms, inference

FAST = dict(epochs=12, hidden_dim=32, latent_dim=16, edge_decoder_hidden=32, quiet=True)


def test_mask_replaces_features():
    module = SpaMaskModule(5, 8, 4)
    with torch.no_grad():
        module.mask_token.copy_(torch.arange(5.0))
    x = torch.randn(6, 5) + 10
    masked = torch.tensor([True, False, True, False, False, False])
    out = module.mask_input(x, masked)
    assert torch.equal(out[masked], module.mask_token.expand(2, 5))
    assert torch.equal(out[~masked], x[~masked])
    module.mask_mode = "reference"  # the reference adds the token: the input leaks through
    ref = module.mask_input(x, masked)
    assert torch.allclose(ref[masked], x[masked] + module.mask_token)


def test_dropped_edges_hidden_in_both_directions(tiny_prepped):
    _, g = tiny_prepped
    torch.manual_seed(0)
    kept, pos = EdgeMasker(g, "undirected", 0.3).draw()
    assert pos.shape[1] > 0
    assert not bool(kept.has_edges_between(pos[0], pos[1]).any())
    assert not bool(kept.has_edges_between(pos[1], pos[0]).any())
    assert bool((pos[0] != pos[1]).all())  # self-loops are never positives
    n = g.num_nodes()
    assert bool(kept.has_edges_between(torch.arange(n), torch.arange(n)).all())
    n_pairs = int(((g.edges()[0] != g.edges()[1]).sum()) // 2)
    assert pos.shape[1] == round(0.3 * n_pairs)
    assert kept.num_edges() == g.num_edges() - 2 * pos.shape[1]


def test_reference_edge_mask_leaks(tiny_prepped):
    _, g = tiny_prepped
    torch.manual_seed(0)
    kept, pos = EdgeMasker(g, "reference", 0.3).draw()
    visible = kept.has_edges_between(pos[0], pos[1]).float().mean()
    assert visible > 0.5  # most "masked" directed edges stay visible through their reverse


def test_negatives_stay_in_slice_and_are_not_edges(tiny_prepped):
    _, g = tiny_prepped
    torch.manual_seed(0)
    u = torch.randint(0, g.num_nodes(), (5000,))
    neg = NegativeSampler(g, g.ndata["slice"])(u)
    assert neg.shape[1] > 4900
    s = g.ndata["slice"]
    assert bool((s[neg[0]] == s[neg[1]]).all())
    assert not bool(g.has_edges_between(neg[0], neg[1]).any())
    assert bool((neg[0] != neg[1]).all())


def test_rows_of_selects_sources():
    pos = torch.tensor([[0, 0, 2, 3, 3, 3], [5, 6, 7, 8, 9, 4]])
    ptr = torch.cumsum(torch.bincount(pos[0], minlength=5), 0)
    out = rows_of(pos, ptr, torch.tensor([3, 1, 0]))
    assert sorted(out.T.tolist()) == [[0, 5], [0, 6], [3, 4], [3, 8], [3, 9]]


def test_sce_loss():
    x = torch.randn(4, 3)
    assert float(sce_loss(x, 2 * x, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(sce_loss(x, -x, 2.0)) == pytest.approx(4.0, rel=1e-5)


def test_prelu_matches_torch_bit_for_bit():
    """The encoder's PReLU (a faster backward) gives nn.PReLU's outputs and gradients exactly,
    at x == 0 and with a negative slope too, so training repeats the old runs bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(700, 96, generator=gen)
    x[0, :10] = 0.0
    grad = torch.randn(700, 96, generator=gen)
    for slope in (0.25, -0.7):
        ours, theirs = PReLU(slope), torch.nn.PReLU(init=slope)
        results = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_()
            out = module(xi)
            out.backward(grad)
            results.append((out.detach(), xi.grad, module.weight.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        assert ours.weight.shape == theirs.weight.shape == (1,)
    x64 = torch.randn(30, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    a64 = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_PReLUFunction.apply, (x64, a64))


def test_loss_decreases_and_domains_recovered(tiny_prepped):
    adata, g = tiny_prepped
    model = si.train(adata, g, epochs=60, seed=0, quiet=True)
    loss = model.history["loss"]
    assert np.mean(loss[-5:]) < 0.7 * np.mean(loss[:5])
    emb = adata.obsm["X_spamask"]
    assert emb.shape == (adata.n_obs, 256)
    truth = adata.obs["ground_truth"]
    emb10 = PCA(10, random_state=0).fit_transform(emb)
    ari_emb = adjusted_rand_score(truth, GaussianMixture(4, random_state=0).fit_predict(emb10))
    ari_pca = adjusted_rand_score(
        truth, GaussianMixture(4, random_state=0).fit_predict(adata.obsm["X_pca"]))
    assert ari_emb > 0.6 and ari_emb > ari_pca + 0.3
    info = adata.uns["spamask"]["train"]
    assert info["seed"] == 0 and info["device"] == "cpu" and len(info["loss"]) == 60
    assert info["versions"]["dgl"] == "2.1.0"
    assert info["versions"]["torch_cpu"] in ("DEFAULT", "AVX2", "AVX512", "VSX", "ZVECTOR")


def test_cpu_determinism(tiny_prepped):
    adata, g = tiny_prepped
    si.train(adata, g, seed=7, key_added="a", **FAST)
    si.train(adata, g, seed=7, key_added="b", **FAST)
    si.train(adata, g, seed=8, key_added="c", **FAST)
    assert np.array_equal(adata.obsm["a"], adata.obsm["b"])
    assert not np.allclose(adata.obsm["a"], adata.obsm["c"])


def test_edge_loss_gradients_repeat_bit_for_bit_with_two_threads():
    """Each node sits in many scored pairs; the gradient rows of those pairs must be summed in
    a fixed order (h[idx]'s backward summed them with atomics and drifted by ~1e-6 per step,
    which 300 epochs and a GMM turned into different domains)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        n = 3000
        graph = dgl.add_self_loop(dgl.rand_graph(n, 6 * n))
        module = SpaMaskModule(16, 32, 16, edge_decoder_dropout=0.0)
        x = torch.randn(n, 16, generator=gen)
        pairs = torch.randint(0, n, (2, 40 * n), generator=gen)  # ~80 pairs per node
        w = gcn_norms(graph)
        grads = []
        for _ in range(8):
            module.zero_grad(set_to_none=True)
            module.edge_loss([graph, graph], [w, w], x, pairs[:, ::2], pairs[:, 1::2]).backward()
            grads.append(torch.cat([p.grad.ravel() for p in module.encoder.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_minibatch_path(tiny_prepped):
    adata, g = tiny_prepped
    nb = dict(minibatch=True, sampler="neighbor", batch_size=128)
    m1 = si.train(adata, g, seed=1, key_added="mb", **nb, **FAST)
    assert adata.obsm["mb"].shape == (adata.n_obs, 16)
    assert adata.uns["spamask"]["train"]["mode"] == "neighbor"
    assert np.isfinite(m1.history["loss"]).all() and len(m1.history["loss"]) == 12
    si.train(adata, g, seed=1, key_added="mb2", **nb, **FAST)
    assert np.array_equal(adata.obsm["mb"], adata.obsm["mb2"])  # sampling is seeded too
    si.train(adata, g, minibatch=False, seed=1, key_added="full", **FAST)
    assert adata.uns["spamask"]["train"]["mode"] == "full-graph"
    assert adata.obsm["full"].shape == (adata.n_obs, 16)


def test_minibatch_without_dropped_edges_keeps_a_finite_loss(tiny_prepped):
    """With a tiny edge-drop rate most minibatches have no hidden edge among their seeds; the
    mean BCE over no pair was NaN and poisoned the weights."""
    adata, g = tiny_prepped
    for sampler in ("neighbor", "subgraph"):
        model = si.train(adata, g, minibatch=True, sampler=sampler, batch_size=16,
                         subgraph_size=16, subgraph_tile_size=8, edge_drop_rate=0.002, seed=0,
                         key_added="few", **{**FAST, "epochs": 2})
        assert np.isfinite(model.history["edge"]).all(), sampler
        assert np.isfinite(model.history["loss"]).all(), sampler
        assert np.isfinite(adata.obsm["few"]).all(), sampler


def test_layerwise_inference_equals_full_graph_encoder(tiny_prepped):
    adata, g = tiny_prepped
    model = si.train(adata, g, seed=0, **FAST)
    x = adata.obsm["X_pca"].astype(np.float32)
    norm = gcn_norms(g)
    with torch.no_grad():
        full = model.module.eval().encoder([g, g], torch.from_numpy(x), [norm, norm]).numpy()
    chunked = inference(model.module, g, x, torch.device("cpu"), batch_size=97)
    assert np.allclose(full, chunked, atol=1e-5)


def test_save_load_embed(tiny_prepped, tmp_path):
    adata, g = tiny_prepped
    model = si.train(adata, g, seed=0, **FAST)
    model.save(tmp_path / "model.pt")
    loaded = si.SpaMask.load(tmp_path / "model.pt")
    assert loaded.config == model.config
    emb = loaded.embed(adata, g, key_added="again")
    assert np.array_equal(emb, adata.obsm["X_spamask"])
    # a new slice embedded with the trained encoder
    part = adata[adata.obs["slice"] == "slice1"].copy()
    part.obs["slice"] = part.obs["slice"].cat.remove_unused_categories()
    new = loaded.embed(part, si.build_graph(part, k=6))
    assert new.shape == (300, 16) and np.isfinite(new).all()


def test_several_models_side_by_side(tiny_prepped, tmp_path):
    adata, g = tiny_prepped
    one = si.train(adata, g, seed=5, key_added="one", **FAST)
    many = si.train(adata, g, seed=5, n_models=3, key_added="many", **FAST)
    assert isinstance(one, si.SpaMask) and isinstance(many, si.SpaMaskEnsemble)
    emb = adata.obsm["many"]
    assert emb.shape == (adata.n_obs, 3 * 16)
    # the first model is the one n_models=1 trains; the others have seeds of their own
    assert np.array_equal(emb[:, :16], adata.obsm["one"])
    assert not np.allclose(emb[:, 16:32], emb[:, :16])
    info = adata.uns["spamask"]["train"]
    seeds = list(info["member_seeds"])
    assert info["n_models"] == 3 and seeds[0] == 5 and len(set(seeds)) == 3
    assert [int(info["members"][str(i)]["seed"]) for i in range(3)] == seeds
    # the same seed trains the same three models
    si.train(adata, g, seed=5, n_models=3, key_added="again", **FAST)
    assert np.array_equal(adata.obsm["again"], emb)
    # saved and loaded, they embed as trained
    many.save(tmp_path / "models.pt")
    loaded = si.SpaMaskEnsemble.load(tmp_path / "models.pt")
    assert loaded.config == many.config and len(loaded.members) == 3
    assert np.array_equal(loaded.embed(adata, g, key_added="loaded"), emb)
    with pytest.raises(si.InputError, match="SpaMaskEnsemble.load"):
        si.SpaMask.load(tmp_path / "models.pt")
    one.save(tmp_path / "model.pt")
    with pytest.raises(si.InputError, match="SpaMask.load"):
        si.SpaMaskEnsemble.load(tmp_path / "model.pt")
    with pytest.raises(si.ConfigError, match="checkpoints hold one model"):
        si.train(adata, g, n_models=2, checkpoint=tmp_path / "ck.pt", checkpoint_every=5,
                 **FAST)
    with pytest.raises(si.ConfigError, match="n_models=0"):
        si.train(adata, g, n_models=0, **FAST)


def test_one_progress_bar_counts_every_model(tiny_prepped, monkeypatch):
    """Models trained side by side share one count of epochs, so the bar's ETA is the time
    left for all of them, not for the model in training."""
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    adata, g = tiny_prepped
    si.train(adata, g, n_models=3, **{**FAST, "epochs": 4, "quiet": False})
    assert [(b.total, b.n) for b in bars] == [(12, 4), (12, 8), (12, 12)]
    assert [b.desc for b in bars] == [f"SpaMask, model {i} of 3" for i in (1, 2, 3)]
    bars.clear()
    si.train(adata, g, **{**FAST, "epochs": 4, "quiet": False})
    assert [(b.total, b.n, b.desc) for b in bars] == [(4, 4, "SpaMask")]


def test_bad_parameters(tiny_prepped, tmp_path):
    adata, g = tiny_prepped
    with pytest.raises(si.ConfigError, match="epochz"):
        si.train(adata, g, epochz=3)
    with pytest.raises(si.ConfigError, match="mask_rate"):
        si.train(adata, g, mask_rate=1.5)
    with pytest.raises(si.InputError, match="X_missing"):
        si.train(adata, g, use_rep="X_missing")
    with pytest.raises(si.InputError, match="model file not found"):
        si.SpaMask.load(tmp_path / "none.pt")
    if not torch.cuda.is_available():
        with pytest.raises(si.ResourceError, match="CUDA"):
            si.train(adata, g, device="cuda", **FAST)


RESUME_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
import spamask_integrate as si
a = si.datasets.synthetic_slices(2, 300, 120, 4, seed=1)
si.preprocess(a, n_top_genes=None, n_comps=20, min_cells=5)
g = si.build_graph(a, k=6)
si.train(a, g, epochs=int(sys.argv[2]), seed=4, hidden_dim=32, latent_dim=16,
         edge_decoder_hidden=32, quiet=True, checkpoint=sys.argv[1], checkpoint_every=2,
         resume=len(sys.argv) > 3)
a.write_h5ad(sys.argv[1] + ".h5ad")
"""


def test_killed_job_resumes_to_the_same_embedding(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import anndata as ad

    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = tmp_path / "ckpt.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "full.pt"), "40"], check=True,
                   env=env)
    job = subprocess.Popen([sys.executable, str(script), str(ckpt), "40"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill it with SIGKILL once a mid-run checkpoint exists
        if ckpt.exists() and torch.load(ckpt)["epochs_done"] >= 4:
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    saved = torch.load(ckpt)["epochs_done"]
    assert 4 <= saved < 40, "the job finished before it could be killed"
    # SIGKILL may land inside a write: the last complete checkpoint stays readable (above) and
    # the resumed job sweeps the stray temporary file away
    subprocess.run([sys.executable, str(script), str(ckpt), "40", "resume"], check=True, env=env)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]
    full = ad.read_h5ad(tmp_path / "full.pt.h5ad")
    resumed = ad.read_h5ad(str(ckpt) + ".h5ad")
    assert np.array_equal(full.obsm["X_spamask"], resumed.obsm["X_spamask"])
    assert np.allclose(full.uns["spamask"]["train"]["loss"], resumed.uns["spamask"]["train"]["loss"])


def test_resume_rejects_another_configuration(tiny_prepped, tmp_path):
    adata, g = tiny_prepped
    si.train(adata, g, seed=0, checkpoint=tmp_path / "c.pt", checkpoint_every=4, **FAST)
    with pytest.raises(si.ConfigError, match="mask_rate"):
        si.train(adata, g, seed=0, mask_rate=0.3, checkpoint=tmp_path / "c.pt", resume=True,
                 **FAST)


def test_handed_over_weights_are_the_moving_average_of_the_steps(tiny_prepped):
    from spamask_integrate.train import SpaMask, Trainer, seed_all

    adata, g = tiny_prepped
    x = adata.obsm["X_pca"].astype(np.float32)
    for decay in (0.5, 0.0):
        config = si.SpamaskConfig(epochs=5, seed=3, quiet=True, hidden_dim=32, latent_dim=16,
                                  edge_decoder_hidden=32, ema_decay=decay)
        seed_all(3)
        model = SpaMask(config, x.shape[1])
        trainer = Trainer(model, g, x, torch.device("cpu"), minibatch=False)
        steps = []
        step = trainer._step

        def recording_step(loss):
            step(loss)
            steps.append({k: v.detach().clone() for k, v in model.module.state_dict().items()})

        trainer._step = recording_step
        trainer.fit()
        trainer.hand_over()
        final = model.module.state_dict()
        assert len(steps) == 5
        for name, value in final.items():
            if not value.is_floating_point():
                continue
            if decay == 0.0:
                expected = steps[-1][name].double()
            else:  # step s of t weighted by decay ** (t - s), the weights summing to one
                w = decay ** torch.arange(len(steps) - 1, -1, -1, dtype=torch.float64)
                expected = sum(wi * st[name].double() for wi, st in zip(w / w.sum(), steps))
            assert torch.allclose(value.double(), expected, atol=1e-5), name
        last = steps[-1]["encoder.convs.0.conv.weight"]
        assert torch.equal(final["encoder.convs.0.conv.weight"], last) == (decay == 0.0)
    with pytest.raises(si.ConfigError, match="ema_decay"):
        si.SpamaskConfig(ema_decay=1.0).validate()
