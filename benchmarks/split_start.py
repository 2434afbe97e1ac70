"""What if the caller's 2 K mixture started from its K components' domains, each cut in two,
instead of from its own 120 random starts? Run by hand; a what-if, not the default.

On each stored embedding (``model_ensembles.py train``) and for SpaMask's caller input as
``run`` builds it and smoothed PCA's (Harmony when the plan has it), with caller seeds s and
s + 1000:

- ``K``: the caller with K components (``n_components=None``); ``check``: the default;
- ``split``: the K components' domains, each cut in two by k-means (10 inits, the caller's
  seed) on the caller's PCA of its input; from those 2 K groups (each spot 0.98 in its
  group) the caller's Potts EM of a 2 K-component EEE mixture, then the caller's join into
  K domains (``merge_components``: the model input and the caller's input as the two views);
- ``split_check``: the default's check between the K components and that join (the join
  kept unless it loses in pair coherence and in the Fisher ratio in ``obsm["X_pca"]``).

Per rule: the harness's score for each caller seed and the ARI between the two calls'
domains (1.0: the same partition). For caller seed s, beside the split's 2 K fit, the
default's own 2 K fit (the medoid of its starts and the Potts EM, as ``cluster`` runs it),
with what a run could choose between the two by: each mixture's mean log-likelihood per spot
and mean-field objective (with the Potts term), and the pair coherence and Fisher ratio of
its joined domains.

Usage: python benchmarks/split_start.py PLAN --tag TAG --seeds 0-9 --store DIR [--name N]
Result: benchmarks/results/split_start_<tag>.json (or --name)
"""

from __future__ import annotations

import importlib

import numpy as np

from _common import (PlanData, caller_seed_rules, caller_seed_summary, print_caller_seed_row,
                     seed_list, stored_embedding, stored_embedding_parser, write_result)

RULES = ("K", "check", "split", "split_check")


def split_groups(x: np.ndarray, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Each of the ``k`` domains of ``labels`` cut in two by k-means on ``x``: group 2 d or
    2 d + 1 for a spot of domain d (a domain of fewer than 4 spots stays whole)."""
    from sklearn.cluster import KMeans

    groups = 2 * labels
    for d in range(k):
        rows = np.flatnonzero(labels == d)
        if len(rows) >= 4:
            groups[rows] += KMeans(2, n_init=10, random_state=seed).fit_predict(x[rows])
    return groups


def mixture_objectives(x: np.ndarray, resp: np.ndarray, share, beta: float) -> dict:
    """The EEE mixture that ``resp`` defines (its M-step, as ``potts_em``'s): the mean
    log-likelihood per spot, and the mean-field objective per spot with the Potts term."""
    from scipy.special import logsumexp

    mixture = importlib.import_module("spamask_integrate.mixture")
    n, dim = x.shape
    nk = resp.sum(axis=0) + 1e-12
    means, cov = mixture.pooled_moments(resp.T @ x, x.T @ x, nk, n, 1e-6)
    chol = np.linalg.cholesky(cov)
    prec_chol = np.linalg.inv(chol).T  # as sklearn's precisions_cholesky_ of a tied model
    log_joint = mixture.tied_log_density(x, means, prec_chol) + np.log(nk / n)
    entropy = -(resp * np.log(resp + 1e-300)).sum(axis=1)
    potts = 0.5 * beta * (resp * (share @ resp)).sum(axis=1)
    return {"loglik": float(logsumexp(log_joint, axis=1).mean()),
            "mean_field": float(((resp * log_joint).sum(axis=1) + potts + entropy).mean())}


def main() -> None:
    import spamask_integrate as si

    cluster = importlib.import_module("spamask_integrate.cluster")
    mixture = importlib.import_module("spamask_integrate.mixture")
    args = stored_embedding_parser(__doc__).parse_args()
    data = PlanData(args.plan)
    adata, batch_key, k, order = data.adata, data.batch_key, data.k, data.order
    adj = data.neighbours()
    share = mixture.neighbour_share(adj)
    beta = cluster.SPATIAL_PRIOR

    def in_obs_order(labels: np.ndarray) -> np.ndarray:
        out = np.empty(adata.n_obs, dtype=np.int64)
        out[order] = labels
        return out

    def score(labels: np.ndarray) -> float:
        adata.obs["called"] = labels.astype(str)
        return data.score("called")

    def join(resp: np.ndarray, key: str) -> np.ndarray:
        mapping = mixture.merge_components(resp, adata.obsm["X_pca"], k,
                                           fitted=adata.obsm[key], rows=order)
        return mapping[resp.argmax(axis=1)]

    def checked(k_labels: np.ndarray, joined: np.ndarray) -> np.ndarray:
        kept, _ = cluster.join_kept(adj, adata.obsm["X_pca"], k_labels, joined, k, rows=order)
        return joined if kept else k_labels

    rows = []
    for seed in seed_list(args.seeds):
        reps = data.caller_inputs(stored_embedding(args.store, args.tag, seed), seed)
        for method, key in reps.items():
            calls: dict = {rule: [] for rule in RULES}
            for caller_seed in (seed, seed + 1000):
                for rule, m in (("K", None), ("check", "auto")):
                    si.cluster(adata, k, "gmm", use_rep=key, batch_key=batch_key,
                               seed=caller_seed, n_components=m, key_added="called")
                    calls[rule].append((adata.obs["called"].cat.codes.to_numpy(),
                                        data.score("called")))
                x = data.caller_view(key, caller_seed)
                k_labels = calls["K"][-1][0][order].astype(np.int64)
                groups = split_groups(x, k_labels, k, caller_seed)
                start = np.eye(2 * k)[groups] * 0.98 + 0.02 / (2 * k)
                resp, _ = mixture.potts_em(x, share, start, beta)
                joined = join(resp, key)
                for rule, labels in (("split", joined), ("split_check", checked(k_labels, joined))):
                    labels = in_obs_order(labels)
                    calls[rule].append((labels, score(labels)))
                if caller_seed == seed:  # the default's own 2 K fit beside the split's
                    _, _, own = cluster._gmm(x, 2 * k, "EEE", seed, 200_000, data.names,
                                             cluster.N_STARTS, beta, share,
                                             cluster.KEEP_STARTS, k)
                    own_joined = join(own, key)
                    fits = {"split": (resp, joined), "starts": (own, own_joined)}
                    fisher = mixture.fisher_ratios(adata.obsm["X_pca"], [joined, own_joined],
                                                   k, rows=order)
                    choice = {name: {**mixture_objectives(x, r, share, beta),
                                     "coherence": cluster.pair_coherence(adj, lab),
                                     "fisher": float(f), "ari": score(in_obs_order(lab))}
                              for (name, (r, lab)), f in zip(fits.items(), fisher)}
            row = {"seed": seed, "method": method, "two_k_fits": choice}
            row.update(caller_seed_rules(calls))
            rows.append(row)
            print_caller_seed_row(seed, method, row, RULES, "| 2 K fits, split / starts: ARI "
                                  + " / ".join(f"{c['ari']:.3f}" for c in choice.values())
                                  + ", log-lik "
                                  + " / ".join(f"{c['loglik']:.3f}" for c in choice.values()))
    summary: dict = {}
    for method in ("spamask", "smoothed_pca"):
        mine = [r for r in rows if r["method"] == method]
        summary.update({f"{method} / {rule}": values for rule, values
                        in caller_seed_summary(mine, RULES).items()})
        summary[f"{method} / split_check up"] = int(sum(r["split_check"]["ari"] > r["check"]["ari"]
                                                        for r in mine))
        for what in ("loglik", "mean_field", "coherence", "fisher"):
            summary[f"{method} / starts' fit higher {what}"] = int(sum(
                r["two_k_fits"]["starts"][what] > r["two_k_fits"]["split"][what] for r in mine))
        summary[f"{method} / starts' fit scores higher"] = int(sum(
            r["two_k_fits"]["starts"]["ari"] > r["two_k_fits"]["split"]["ari"] for r in mine))
    for name, values in summary.items():
        print(name, values)
    write_result(args.name or f"split_start_{args.tag}",
                 {"plan": args.plan, "tag": args.tag, "seeds": seed_list(args.seeds),
                  "n_domains": k, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
