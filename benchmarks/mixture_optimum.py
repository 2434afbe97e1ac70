"""Does the caller's mixture hold the regions? A diagnosis on stored embeddings, run by hand.

Where SpaMask's domains fall short, the cause may be the embedding (it does not hold the
regions) or the domain caller (it holds them, but the caller's mixture picks another
partition). For each stored embedding (``model_ensembles.py train``) this script builds the
caller's input as ``run`` does (the context block beside the embedding, Harmony when the plan
has it), and smoothed PCA's beside it (Harmony likewise), reduces each to the caller's PCA-30
in the caller's spot order, and measures on the labelled spots:

- ``probe``: how much of the regions a linear read-out finds in that input (logistic
  regression, C = 0.1, on standardised components; accuracy over five folds of spatial
  blocks: each slice cut into five strips by its first coordinate, so that a fold is never
  next to its own training spots);
- ``oracle``: the shared-covariance (EEE) mixture of K components, as the caller fits it,
  started at the true regions' weights, means and pooled covariance, and run to convergence:
  its pooled ARI (no spatial prior, no join) and mean log-likelihood per spot;
- ``chosen``: the same for the start the caller picks among its own 120 starts (the medoid
  of the likelier three quarters, :func:`~spamask_integrate.mixture.typical_start`; the
  starts are fitted on every spot, as the caller fits them up to 20,000 spots);
- ``likeliest``: the start with the highest likelihood; ``best_start_ari``: the highest ARI
  any of the 120 starts reaches; ``share_above_oracle``: the share of starts more likely
  than the oracle's optimum.

If the oracle's optimum scores well but is less likely than the caller's starts, the
embedding holds the regions and the mixture's likelihood prefers another partition.

Usage: python benchmarks/mixture_optimum.py PLAN --tag TAG --seeds 0-9 --store DIR [--name N]
Result: benchmarks/results/mixture_optimum_<tag>.json (or --name)
"""

from __future__ import annotations

import numpy as np

from _common import PlanData, seed_list, stored_embedding, stored_embedding_parser, write_result


def probe_accuracy(x: np.ndarray, labels: np.ndarray, blocks: np.ndarray) -> float:
    """Mean accuracy of a linear read-out of ``labels`` from ``x`` over spatial-block folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return float(cross_val_score(model, x, labels, groups=blocks, cv=GroupKFold(5)).mean())


def spatial_blocks(xy: np.ndarray, slices: np.ndarray, n: int = 5) -> np.ndarray:
    """Block 0..n-1 of each spot: its slice cut into ``n`` strips of equal size by x."""
    out = np.zeros(len(xy), dtype=np.int64)
    for name in np.unique(slices):
        idx = np.flatnonzero(slices == name)
        edges = np.quantile(xy[idx, 0], np.linspace(0, 1, n + 1)[1:-1])
        out[idx] = np.digitize(xy[idx, 0], edges)
    return out


def diagnose(x: np.ndarray, codes: np.ndarray, groups: np.ndarray, blocks: np.ndarray,
             k: int, seed: int) -> dict:
    """The measurements of the module's docstring for one input ``x`` (caller order);
    ``codes`` the region of each spot (-1: unlabelled)."""
    from sklearn.metrics import adjusted_rand_score

    from spamask_integrate import mixture as M

    known = codes >= 0
    y = codes[known]

    def ari(g) -> float:
        return float(adjusted_rand_score(y, g.predict(x[known])))

    regions = np.unique(y)
    weights = np.array([np.mean(y == r) for r in regions])
    means = np.stack([x[known][y == r].mean(axis=0) for r in regions])
    centred = x[known] - means[np.searchsorted(regions, y)]
    cov = centred.T @ centred / len(y) + 1e-5 * np.eye(x.shape[1])
    oracle = M.fit_gmm(x, len(regions), "EEE", seed, weights_init=weights, means_init=means,
                       precisions_init=np.linalg.inv(cov))
    fits = M.fit_starts(x, k, "EEE", M.start_seeds(seed, M.N_STARTS))
    chosen, _, _ = M.typical_start(fits, x, groups, k, seed=seed)
    ll = np.array([g.score(x) for g in fits])
    likeliest = int(np.argmax(ll))
    oracle_ll = float(oracle.score(x))
    return {"probe": probe_accuracy(x[known], y, blocks[known]),
            "oracle_ari": ari(oracle), "oracle_ll": oracle_ll,
            "chosen_ari": ari(fits[chosen]), "chosen_ll": float(ll[chosen]),
            "likeliest_ari": ari(fits[likeliest]), "likeliest_ll": float(ll[likeliest]),
            "best_start_ari": max(ari(g) for g in fits),
            "share_above_oracle": float(np.mean(ll > oracle_ll))}


def main() -> None:
    args = stored_embedding_parser(__doc__).parse_args()
    data = PlanData(args.plan)
    adata, order = data.adata, data.order
    labels = adata.obs[data.label_key].astype(str).to_numpy()[order]
    known = ~np.isin(labels, ["nan", "None", ""])
    codes = np.full(len(labels), -1)
    codes[known] = np.unique(labels[known], return_inverse=True)[1]
    blocks = spatial_blocks(np.asarray(adata.obsm["spatial"], dtype=np.float64)[order],
                            data.names)
    rows: dict = {"spamask": {}, "smoothed_pca": {}}
    for seed in seed_list(args.seeds):
        reps = data.caller_inputs(stored_embedding(args.store, args.tag, seed), seed)
        for method, key in reps.items():
            x = data.caller_view(key, seed)
            rows[method][str(seed)] = diagnose(x, codes, data.names, blocks, data.k, seed)
            print(seed, method, {k: round(v, 4) for k, v in rows[method][str(seed)].items()},
                  flush=True)
    summary = {method: {key: {"mean": float(np.mean([r[key] for r in per.values()])),
                              "sd": float(np.std([r[key] for r in per.values()], ddof=1))}
                        for key in next(iter(per.values()))}
               for method, per in rows.items()}
    for method, values in summary.items():
        print(method, ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in values.items()))
    write_result(args.name or f"mixture_optimum_{args.tag}",
                 {"plan": args.plan, "tag": args.tag, "seeds": seed_list(args.seeds),
                  "n_domains": data.k, "harmony": data.harmony, "rows": rows,
                  "summary": summary})


if __name__ == "__main__":
    main()
