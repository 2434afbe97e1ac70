import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

import spamask_integrate as si
from conftest import logged_warnings
from spamask_integrate.cluster import refine_labels, same_slice_neighbours
from spamask_integrate.mixture import KEEP_STARTS, N_STARTS


@pytest.fixture
def blobs():
    a = si.datasets.synthetic_slices(2, 200, 10, 4, seed=0)
    truth = a.obs["ground_truth"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (4, 8))
    a.obsm["X_spamask"] = centres[truth] + rng.normal(0, 1, (a.n_obs, 8))
    return a, truth


@pytest.mark.parametrize("method", ["gmm", "kmeans", "leiden"])
def test_exactly_k_domains(blobs, method):
    a, truth = blobs
    si.cluster(a, 4, method, use_rep="X_spamask")
    dom = a.obs["domain"]
    assert dom.dtype.name == "category" and list(dom.cat.categories) == ["0", "1", "2", "3"]
    assert dom.nunique() == 4
    assert adjusted_rand_score(truth, dom) > 0.9
    assert a.uns["spamask"]["cluster"]["method"] == method


def test_leiden_hits_other_k(blobs):
    a, _ = blobs
    si.cluster(a, 6, "leiden", use_rep="X_spamask")
    assert a.obs["domain"].nunique() == 6


def test_estimate_k(blobs):
    a, _ = blobs
    si.cluster(a, None, "gmm", use_rep="X_spamask", k_range=(2, 8))
    info = a.uns["spamask"]["cluster"]
    assert info["n_domains"] == 4 and info["k_estimated"] and len(info["bic"]) == 7


def test_deterministic(blobs):
    a, _ = blobs
    si.cluster(a, 4, "gmm", use_rep="X_spamask", seed=3)
    first = a.obs["domain"].copy()
    si.cluster(a, 4, "gmm", use_rep="X_spamask", seed=3)
    assert (first == a.obs["domain"]).all()


@pytest.fixture
def noisy_layers():
    """Spatially coherent domains whose single spots are too noisy for a plain GMM."""
    a = si.datasets.synthetic_slices(2, 900, 20, 4, seed=0)
    truth = a.obs["ground_truth"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 8))
    a.obsm["X_emb"] = (centres[truth] + rng.normal(0, 1.3, (a.n_obs, 8))).astype(np.float32)
    si.build_graph(a, k=6)
    return a, truth


@pytest.fixture
def smooth_layers():
    """Two slices of four layers, two thick and two thin, whose embedding is mostly a smooth
    gradient of depth with a small step at each boundary (a spatially smoothed embedding),
    while the input (``X_pca``) has each layer's own expression."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(30), np.arange(30))
    xy = np.tile(np.c_[xs.ravel(), ys.ravel()].astype(float), (2, 1))
    depth = xy[:, 1] / 29
    truth = np.searchsorted([0.4, 0.5, 0.9], depth, side="right")
    a = ad.AnnData(np.zeros((len(xy), 1), np.float32))
    a.obs_names = [f"spot{i}" for i in range(len(xy))]
    a.obs["slice"] = pd.Categorical(np.repeat(["slice0", "slice1"], 900))
    a.obsm["spatial"] = xy
    a.obsm["X_pca"] = (rng.normal(0, 1, (4, 10))[truth]
                       + rng.normal(0, 0.7, (len(xy), 10))).astype(np.float32)
    step = 0.2 * rng.normal(0, 1, (4, 3))[truth]
    a.obsm["X_emb"] = (np.c_[6 * depth, step]
                       + rng.normal(0, 0.3, (len(xy), 4))).astype(np.float32)
    si.build_graph(a, k=6)
    return a, truth


def test_merge_recovers_thin_layers_a_smooth_embedding_runs_together(smooth_layers):
    a, truth = smooth_layers
    unmerged = []
    for seed in (0, 1):
        si.cluster(a, 4, use_rep="X_emb", n_components=None, seed=seed)  # K, no merge
        unmerged.append(adjusted_rand_score(truth, a.obs["domain"]))
        assert a.uns["spamask"]["cluster"]["n_components"] == 4
    # K components tile the gradient in even slabs: a thick layer is cut, thin ones join
    assert max(unmerged) < 0.6
    with logged_warnings("spamask_integrate.cluster") as warned:
        for seed in (0, 1):
            si.cluster(a, 4, use_rep="X_emb", seed=seed)  # the default, "auto": 2 K, joined
            assert adjusted_rand_score(truth, a.obs["domain"]) > 0.9
            info = a.uns["spamask"]["cluster"]
            assert info["n_components"] == 8 and info["merge_rep"] == "X_pca"
            assert info["merge_fitted"] == "X_emb"
            # kept: the caller's model scores the joined domains higher, their expression
            # fitting far better; in space they lose a little (the slabs of this straight
            # gradient have straight edges)
            assert info["merge_checked"] and info["merge_kept"]
            assert info["score_merged"] > info["score_k"]
            assert info["loglik_merged"] - info["loglik_k"] > 0.5
            assert info["neighbours_merged"] < info["neighbours_k"]
            assert info["distinct_merged"] > info["distinct_k"]
            assert info["coherence_merged"] < info["coherence_k"]
            assert info["score_merged"] == pytest.approx(
                info["loglik_merged"] + info["spatial_prior"] * info["neighbours_merged"])
            assert a.obs["domain"].nunique() == 4
    # kept although patchier in space, so each call tells the user so, and what to compare
    told = [m for m in warned if "kept although they are patchier" in m]
    assert len(told) == 2 and all("n_components=4" in m for m in told)
    # without the model input to join them in, "auto" fits K components
    b = a.copy()
    del b.obsm["X_pca"]
    si.cluster(b, 4, use_rep="X_emb", n_components="auto", seed=0)
    assert b.uns["spamask"]["cluster"]["n_components"] == 4
    si.cluster(a, 4, use_rep="X_emb", n_components=12, n_starts=20, seed=0)
    assert a.uns["spamask"]["cluster"]["n_components"] == 12
    assert a.obs["domain"].nunique() == 4


def test_auto_keeps_k_components_where_the_model_scores_the_join_lower(smooth_layers,
                                                                     monkeypatch):
    import importlib

    a, truth = smooth_layers
    si.cluster(a, 4, use_rep="X_emb", n_components=None, seed=0, key_added="k_fit")
    module = importlib.import_module("spamask_integrate.cluster")

    def scrambled(resp, ref, k, **kwargs):  # a join that ignores the data: 0+4, 1+5, ...
        return np.arange(resp.shape[1]) % k

    monkeypatch.setattr(module, "merge_components", scrambled)
    with logged_warnings("spamask_integrate.cluster") as warned:
        si.cluster(a, 4, use_rep="X_emb", seed=0)
    assert not [m for m in warned if "patchier" in m]
    info = a.uns["spamask"]["cluster"]
    assert info["merge_checked"] and not info["merge_kept"]
    assert info["score_merged"] < info["score_k"]
    assert info["coherence_merged"] < info["coherence_k"]
    assert info["distinct_merged"] < info["distinct_k"]
    assert info["n_components"] == 4 and info["merge_rep"] == ""
    assert (a.obs["domain"] == a.obs["k_fit"]).all()  # the K-component fit, unchanged
    # with no spatial graph or coordinates to judge by, "auto" fits K components
    b = a.copy()
    del b.obsm["spatial"], b.obsp["spamask_connectivities"]
    si.cluster(b, 4, use_rep="X_emb", spatial_prior=0, seed=0)
    assert b.uns["spamask"]["cluster"]["n_components"] == 4
    assert "merge_checked" not in b.uns["spamask"]["cluster"]


def test_pair_coherence_counts_neighbour_pairs_in_one_domain():
    import scipy.sparse as sp

    from spamask_integrate.cluster import pair_coherence

    # a path 0-1-2-3, both directions: pairs (0,1), (1,2), (2,3)
    rows, cols = [0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]
    adj = sp.csr_matrix((np.ones(6), (rows, cols)), shape=(4, 4))
    assert pair_coherence(adj, np.array([0, 0, 1, 1])) == pytest.approx(2 / 3)
    assert pair_coherence(adj, np.array([0, 1, 0, 1])) == 0.0
    assert pair_coherence(sp.csr_matrix((4, 4)), np.zeros(4, int)) == 1.0


def test_join_kept_weighs_a_patchier_map_against_the_expression_it_explains():
    import scipy.sparse as sp

    from spamask_integrate.cluster import join_kept, pair_coherence
    from spamask_integrate.mixture import fisher_ratios

    # one 40 x 40 slice: domain 0 the left half, with a weak gradient of feature 0 along y
    # and its own noise; domains 1 and 2 two strips on the right that differ a little
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(40), np.arange(40))
    x, y = xs.ravel(), ys.ravel()
    truth = np.where(x < 20, 0, np.where(x < 30, 1, 2))
    view = rng.normal(0, 1, (1600, 6))
    view[:, 1] += 6 * (truth > 0) + 0.6 * (truth == 2)
    view[:, 0] += np.where(truth == 0, y / 20, 0)
    d2 = (x[:, None] - x[None]) ** 2 + (y[:, None] - y[None]) ** 2
    adj = sp.csr_matrix((d2 == 1).astype(float))  # the 4 grid neighbours
    # the 2 K fit's signature where slices cover different parts of a tissue: the large
    # domain cut along its own spread of expression (here spot by spot, so the cut is
    # ragged), the two similar small ones joined
    cut = np.where(truth == 0, (view[:, 0] > np.median(view[truth == 0, 0])).astype(int),
                   2)
    kept, fit = join_kept(adj, view, truth, cut, 3)
    assert fit["distinct"][1] > fit["distinct"][0]  # more distinct in expression ...
    assert fit["loglik"][1] > fit["loglik"][0]
    assert fit["coherence"][1] < fit["coherence"][0] - 0.1  # ... and far patchier in space
    assert not kept and fit["score"][1] < fit["score"][0]
    assert fit["coherence"] == [pair_coherence(adj, truth), pair_coherence(adj, cut)]
    assert fit["distinct"] == pytest.approx(fisher_ratios(view, [truth, cut], 3))
    # without a spatial prior the expression decides alone, and keeps the cut
    assert join_kept(adj, view, truth, cut, 3, beta=0.0)[0]
    # the same domain cut in two halves along a straight line costs little in space (less
    # than joining the two strips saves): the join is kept
    straight = np.where(truth == 0, (y >= 20).astype(int), 2)
    assert join_kept(adj, view, truth, straight, 3)[0]


def test_partition_loglik_is_the_fitted_gaussian_mixture_of_the_hard_labels():
    from scipy.stats import multivariate_normal

    from spamask_integrate.mixture import partition_fits

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), [100, 200, 300])
    view = rng.normal(0, 1, (600, 3)) + 3 * np.eye(3)[labels]
    share = np.bincount(labels) / 600
    means = np.stack([view[labels == g].mean(axis=0) for g in range(3)])
    cov = np.cov((view - means[labels]).T, bias=True)
    expected = np.mean(np.log(share[labels]) + [
        multivariate_normal(means[g], cov).logpdf(v) for v, g in zip(view, labels)])
    (fisher, loglik), = partition_fits(view, [labels], 3)
    assert loglik == pytest.approx(expected, rel=1e-5)
    rows = rng.permutation(600)  # label i belongs to row rows[i], read in chunks
    (_, again), = partition_fits(view, [labels[rows]], 3, rows=rows, chunk=77)
    assert again == pytest.approx(loglik, rel=1e-9)


def test_fisher_ratio_reads_how_distinct_the_domains_are():
    from spamask_integrate.mixture import fisher_ratio

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 200)
    x = rng.normal(0, 1, (600, 4))
    apart = x + np.eye(4)[labels] * 4
    # each domain shifted 4 sds along its own feature: S_w ~ I, trace S_b = 3 x 16 x 2/9 ~ 10.7
    assert fisher_ratio(apart, labels, 3) > 8
    assert fisher_ratio(x, labels, 3) < 0.1  # the same noise without the shifts
    shuffled = rng.permutation(labels)
    assert fisher_ratio(apart, shuffled, 3) < 0.1
    # rows: label i belongs to row rows[i]; chunks give the same value
    rows = rng.permutation(600)
    assert fisher_ratio(apart, labels[rows], 3, rows=rows, chunk=77) == pytest.approx(
        fisher_ratio(apart, labels, 3), rel=1e-9)


def test_merge_components_joins_what_the_reference_does_not_tell_apart():
    from spamask_integrate.mixture import merge_components

    rng = np.random.default_rng(0)
    comp = np.repeat(np.arange(6), 100)
    resp = np.eye(6)[comp]
    # components 0-1-2, 3-4 and 5 share their mean in the reference
    centre = np.array([0, 0, 0, 1, 1, 2])[comp]
    ref = rng.normal(0, 0.1, (600, 3)) + np.eye(3)[centre] * 3
    mapping = merge_components(resp, ref, 3)
    groups = {tuple(np.flatnonzero(mapping == g)) for g in range(3)}
    assert groups == {(0, 1, 2), (3, 4), (5,)}
    np.testing.assert_array_equal(merge_components(resp, ref, 6), np.arange(6))
    # chunked sums give the same answer
    np.testing.assert_array_equal(merge_components(resp, ref, 3, chunk=7), mapping)


def test_merge_components_joins_only_what_both_views_call_alike():
    # osmFISH's case: components 0-1-2 share their expression (ref), but in the view the
    # mixture was fitted to (fitted) component 2 lies elsewhere, like one layer's lateral and
    # medial halves; 3-4 are alike in both views, like two slabs of one layer
    from spamask_integrate.mixture import merge_components

    rng = np.random.default_rng(1)
    comp = np.repeat(np.arange(6), 100)
    resp = np.eye(6)[comp]
    ref = rng.normal(0, 0.1, (600, 3)) + np.eye(3)[np.array([0, 0, 0, 1, 1, 2])[comp]] * 3
    fitted = rng.normal(0, 0.1, (600, 4)) + np.eye(4)[np.array([0, 0, 1, 2, 2, 3])[comp]] * 3
    groups = lambda mapping: {tuple(np.flatnonzero(mapping == g)) for g in range(mapping.max() + 1)}  # noqa: E731
    assert groups(merge_components(resp, ref, 4, fitted=fitted)) == {(0, 1), (2,), (3, 4), (5,)}
    # rows: resp's row i is the views' row rows[i]
    rows = rng.permutation(600)
    inv = np.argsort(rows)
    np.testing.assert_array_equal(
        merge_components(resp, ref[inv], 4, fitted=fitted[inv], rows=rows, chunk=50),
        merge_components(resp, ref, 4, fitted=fitted))


def test_caller_recovers_planted_domains_where_plain_gmm_fails(noisy_layers):
    a, truth = noisy_layers
    plain = []
    for seed in range(3):
        si.cluster(a, 4, use_rep="X_emb", n_starts=1, spatial_prior=0, seed=seed)
        plain.append(adjusted_rand_score(truth, a.obs["domain"]))
    si.cluster(a, 4, use_rep="X_emb", n_starts=1, spatial_prior=0, refine=True, seed=0)
    vote = adjusted_rand_score(truth, a.obs["domain"])
    si.cluster(a, 4, use_rep="X_emb", seed=0)
    caller = adjusted_rand_score(truth, a.obs["domain"])
    # the majority vote after the fact helps; re-estimating the mixture under the
    # neighbourhood prior helps more
    assert max(plain) < 0.5 < vote < 0.85 < caller
    info = a.uns["spamask"]["cluster"]
    assert info["n_starts"] == N_STARTS and info["spatial_prior"] > 0
    assert 0 < info["start_agreement"] <= 1 and 0 < info["kept_agreement"] <= 1
    assert info["keep_starts"] == KEEP_STARTS
    assert info["kept_starts"] == int(np.ceil(KEEP_STARTS * N_STARTS)) < N_STARTS


def test_potts_em_reports_whether_it_converged(noisy_layers):
    from spamask_integrate.cluster import SPATIAL_PRIOR, same_slice_neighbours
    from spamask_integrate.mixture import fit_gmm, neighbour_share, potts_em

    a, truth = noisy_layers
    x = a.obsm["X_emb"].astype(np.float64)
    share = neighbour_share(same_slice_neighbours(a, "slice"))
    start = fit_gmm(x, 4, "EEE", 0).predict_proba(x)
    q, info = potts_em(x, share, start, SPATIAL_PRIOR)
    assert info["potts_converged"] and 1 < info["potts_iterations"] < 100
    assert info["potts_change"] < 1e-4
    assert adjusted_rand_score(truth, q.argmax(axis=1)) > 0.85
    # cut short: the same steps, reported as not converged
    q2, info2 = potts_em(x, share, start, SPATIAL_PRIOR, max_iter=2)
    assert info2["potts_iterations"] == 2 and not info2["potts_converged"]
    assert info2["potts_change"] > 1e-4 and info2["potts_switched"] > 0
    assert info["potts_switched"] == 0  # converged: the last step moved no domain
    # the short run is the full run's first two steps: going on from it ends where it ends
    q3, info3 = potts_em(x, share, q2, SPATIAL_PRIOR)
    np.testing.assert_array_equal(q3, q)
    assert info3["potts_iterations"] == info["potts_iterations"] - 2
    # the caller records it
    si.cluster(a, 4, use_rep="X_emb", seed=0)
    rec = a.uns["spamask"]["cluster"]
    assert rec["potts_converged"] and 1 < rec["potts_iterations"] < 100
    si.cluster(a, 4, use_rep="X_emb", spatial_prior=0, seed=0)
    assert "potts_iterations" not in a.uns["spamask"]["cluster"]


def test_softmax_rows_is_scipys_up_to_rounding():
    from scipy.special import logsumexp

    from spamask_integrate.mixture import softmax_rows

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 30, (500, 7)) + rng.normal(0, 1e4, (500, 1))  # far from 0
    want = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    got = softmax_rows(logits.copy())
    # scipy subtracts log-sum-exp after adding the offset back: its own rounding is about
    # eps times the offset (1e4 here) in the exponent
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))


def test_caller_gives_one_answer_for_every_seed(noisy_layers):
    a, _ = noisy_layers
    answers = []
    for seed in (0, 1, 2):
        si.cluster(a, 4, use_rep="X_emb", seed=seed)
        answers.append(a.obs["domain"].to_numpy().copy())
    assert all(np.array_equal(answers[0], other) for other in answers[1:])


def test_medoid_is_chosen_among_the_most_likely_starts(monkeypatch):
    """Starts stuck in a poor optimum must not outvote the better ones: of ten starts, six
    give a partition of lower log-likelihood and four a better one. All ten vote for the
    six; kept at the top half by likelihood, the four decide. kept_starts breaks ties by
    position and keeps at least one start."""
    from spamask_integrate import mixture as M

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    good = (x[:, 0] > 0).astype(int)
    poor = (x[:, 1] > 0.5).astype(int)

    class Start:
        def __init__(self, labels, ll):
            self.labels, self.lower_bound_ = labels, ll

        def predict(self, rows):  # 400 spots: the probe is every row, in order
            assert np.array_equal(rows, x)
            return self.labels

    starts = [Start(poor, -3.0 - 0.01 * i) for i in range(6)] + \
             [Start(good, -2.0 - 0.01 * i) for i in range(4)]
    monkeypatch.setattr(M, "fit_starts", lambda xs, k, model, seeds: starts[:len(seeds)])
    groups = np.zeros(len(x), dtype=str)
    every, _, kept_all = M.medoid_start(x, groups, 2, n_starts=10, keep=1.0)
    assert every.labels is poor and len(kept_all) == 10
    trimmed, agree, kept = M.medoid_start(x, groups, 2, n_starts=10, keep=0.5)
    assert trimmed.labels is good and agree.shape == (10, 10)
    assert list(kept) == [0, 6, 7, 8, 9]  # the four good starts and the best poor one
    best, _, kept_again = M.typical_start(starts, x, groups, 2, keep=0.5)  # the same choice
    assert starts[best] is trimmed and list(kept_again) == list(kept)
    assert list(M.kept_starts([1.0, 2.0, 2.0, 0.5], 0.5)) == [1, 2]
    assert list(M.kept_starts([1.0, 1.0, 1.0], 0.34)) == [0, 1]
    assert list(M.kept_starts([5.0], 0.1)) == [0]
    with pytest.raises(ValueError, match="keep=0"):
        M.medoid_start(x, groups, 2, n_starts=10, keep=0)


def test_starts_side_by_side_equal_one_after_another(noisy_layers):
    """The caller fits its starts in threads, one BLAS thread each: every fit must be the
    fit of its seed alone, whatever runs beside it and however many threads run."""
    from threadpoolctl import threadpool_limits

    from spamask_integrate.mixture import fit_gmm, fit_starts, start_seeds

    a, _ = noisy_layers
    x = a.obsm["X_emb"].astype(np.float64)
    seeds = start_seeds(0, 6)
    with threadpool_limits(limits=1):
        alone = [fit_gmm(x, 4, "EEE", s) for s in seeds]
    for limit in (1, 2):  # one worker, then two side by side
        with threadpool_limits(limits=limit, user_api="blas"):
            together = fit_starts(x, 4, "EEE", seeds)
        for one, other in zip(alone, together):
            assert np.array_equal(one.means_, other.means_)
            assert np.array_equal(one.precisions_cholesky_, other.precisions_cholesky_)
            assert one.n_iter_ == other.n_iter_


def test_tied_mixture_is_sklearns_fit():
    """The caller's tied GMM computes its log-densities its own way (one product with the
    precision factor): it must give sklearn's densities, and sklearn's fit, also for data
    far from the origin, and leave the other covariance types to sklearn."""
    from sklearn.mixture import GaussianMixture

    from spamask_integrate.mixture import TiedGaussianMixture

    rng = np.random.default_rng(3)
    centres = rng.normal(0, 4, (5, 12))
    truth = rng.integers(0, 5, 1500)
    x = 1e3 + centres[truth] + rng.normal(0, 1, (1500, 12)) * rng.uniform(0.5, 2, 12)
    for kind in ("tied", "full", "diag"):
        ours = TiedGaussianMixture(5, covariance_type=kind, random_state=0).fit(x)
        theirs = GaussianMixture(5, covariance_type=kind, random_state=0).fit(x)
        np.testing.assert_allclose(ours._estimate_log_prob(x), theirs._estimate_log_prob(x),
                                   rtol=1e-9, atol=1e-7)
        assert ours.n_iter_ == theirs.n_iter_
        np.testing.assert_allclose(ours.means_, theirs.means_, rtol=1e-9)
        assert np.array_equal(ours.predict(x), theirs.predict(x))
        assert adjusted_rand_score(truth, ours.predict(x)) > 0.95
    # the override is private sklearn API: if sklearn renamed it, the fit above would still
    # be sklearn's (and slow); make sure the tied fit goes through our density
    from unittest import mock

    from spamask_integrate import mixture

    with mock.patch.object(mixture, "tied_log_density", wraps=mixture.tied_log_density) as spy:
        TiedGaussianMixture(5, covariance_type="tied", random_state=0).fit(x)
    assert spy.call_count > 1


def test_pairwise_ari_matches_sklearn():
    from spamask_integrate.mixture import pairwise_ari

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (6, 400))
    labels[1] = (labels[0] + 1) % 5  # the same partition, other codes
    labels[2] = labels[3] = 0  # one domain only: sklearn's 1.0 between two such
    labels[4, :200] = labels[0, :200]
    got = pairwise_ari(labels, 5)
    want = np.array([[adjusted_rand_score(a, b) for b in labels] for a in labels])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[0, 1] == pytest.approx(1.0) and got[2, 3] == 1.0


@pytest.mark.parametrize("fixture", ["noisy_layers", "smooth_layers"])
def test_caller_does_not_depend_on_the_order_of_slices(fixture, request):
    a, _ = request.getfixturevalue(fixture)
    merge = {"n_components": 8} if fixture == "smooth_layers" else {}
    si.cluster(a, 4, use_rep="X_emb", seed=0, **merge)
    first = a.obs["domain"].copy()
    # slices listed the other way round, spots shuffled within them
    rng = np.random.default_rng(1)
    half = a.n_obs // 2
    order = np.concatenate([rng.permutation(np.arange(half, a.n_obs)), rng.permutation(half)])
    b = a[order].copy()
    b.obs["slice"] = b.obs["slice"].cat.reorder_categories(["slice1", "slice0"])
    si.cluster(b, 4, use_rep="X_emb", seed=0, **merge)
    assert (b.obs["domain"] == first.loc[b.obs_names]).all()


def test_refine_uses_only_same_slice_neighbours(tiny_slices):
    # graph with a cross-slice edge: refinement must ignore it
    si.build_graph(tiny_slices, k=6, extra_edges=(np.arange(300), np.arange(300, 600)))
    adj = same_slice_neighbours(tiny_slices)
    codes = tiny_slices.obs["slice"].cat.codes.to_numpy()
    coo = adj.tocoo()
    assert (codes[coo.row] == codes[coo.col]).all() and adj.nnz > 0
    # slice0 all label 0, slice1 all label 1: with cross edges a vote could flip; it must not
    labels = np.repeat([0, 1], 300)
    assert np.array_equal(refine_labels(tiny_slices, labels), labels)
    # an isolated wrong label inside a uniform region is fixed
    labels2 = labels.copy()
    labels2[10] = 1
    assert refine_labels(tiny_slices, labels2)[10] == 0


def test_refine_in_cluster_keeps_unrefined(blobs):
    a, _ = blobs
    si.cluster(a, 4, use_rep="X_spamask", refine=True)
    assert "domain_unrefined" in a.obs and a.uns["spamask"]["cluster"]["refine"]


def test_errors(blobs):
    a, _ = blobs
    with pytest.raises(si.ConfigError, match="n_domains=1"):
        si.cluster(a, 1, use_rep="X_spamask")
    with pytest.raises(si.ConfigError, match="method='dbscan'"):
        si.cluster(a, 4, "dbscan", use_rep="X_spamask")
    with pytest.raises(si.InputError, match="X_none"):
        si.cluster(a, 4, use_rep="X_none")
    with pytest.raises(si.ConfigError, match="n_starts=0"):
        si.cluster(a, 4, use_rep="X_spamask", n_starts=0)
    with pytest.raises(si.ConfigError, match="keep_starts=1.5"):
        si.cluster(a, 4, use_rep="X_spamask", keep_starts=1.5)
    for bad in (dict(keep_starts=0.0), dict(n_starts=0)):  # run() refuses before training
        with pytest.raises(si.ConfigError, match=f"{next(iter(bad))}=0"):
            si.run(a, None, **bad)
    with pytest.raises(si.ConfigError, match="gmm_model='EEE'"):
        si.cluster(a, 4, use_rep="X_spamask", gmm_model="VVV")
    with pytest.raises(si.ConfigError, match="n_components=3"):
        si.cluster(a, 4, use_rep="X_spamask", n_components=3)
    with pytest.raises(si.ConfigError, match="needs method='gmm'"):
        si.cluster(a, 4, "kmeans", use_rep="X_spamask", n_components=8)
    with pytest.raises(si.InputError, match="X_nopca"):
        si.cluster(a, 4, use_rep="X_spamask", n_components=8, merge_rep="X_nopca")
    for bad in ("2k", 1, 2.5, True):
        with pytest.raises(si.ConfigError, match="n_components="):
            si.cluster(a, 4, use_rep="X_spamask", n_components=bad)
    with pytest.raises(si.ConfigError, match="n_components='2k'"):  # before training
        si.run(a, None, n_components="2k")
