"""The caller's spatial (Potts) EM: its steps, its 100-step limit, and its softmax.

For each input, fits the caller's medoid start as ``cluster`` does (120 starts; above 20,000
spots the refit on 200,000), then runs the Potts EM from it three ways, one after the other:
- ``before``: the EM as it was until 2026-12-06 (scipy's ``logsumexp``, at most 100 steps);
- ``now``: ``mixture.potts_em`` (its own row softmax, at most 100 steps, the default);
- ``to_convergence``: ``potts_em`` with at most 1000 steps.
It records per input whether ``before`` and ``now`` give the same domains spot for spot, how
many steps each took and whether they converged, their seconds, and how many spots (and how
much ARI) running to convergence changes. With ``--n-components M`` the EM runs with M
components and the domains are those after the merge into K.

Inputs: the stored embeddings of today's defaults (``--plan ... --tag ... --store ...``, the
caller's input built as ``run`` builds it), or one run's output (``--h5ad
run/integrated.h5ad``, its ``X_spamask_context_harmony`` and graph; e.g. the default run on
10^6 tiled spots).

Usage: python benchmarks/potts_steps.py --plan benchmarks/plans/dlpfc_default.yaml --tag dlpfc
           --seeds 0-29 --store /tmp/cstore
       python benchmarks/potts_steps.py --h5ad /tmp/run_tiled_1000000_0/integrated.h5ad
           --seeds 2023 --name potts_steps_tiled_1000000
Result: benchmarks/results/potts_steps_<tag>[_<M>].json (or --name)
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np

from _common import PlanData, seed_list, stored_embedding, write_result


def potts_em_before(x, share, resp, beta, max_iter=100, tol=1e-4, reg=1e-6):
    """The Potts EM of before 2026-12-06, step for step (scipy's logsumexp)."""
    from scipy.special import logsumexp

    from spamask_integrate.mixture import pooled_moments

    n, d = x.shape
    gram = x.T @ x
    q = resp
    steps = 0
    for steps in range(1, max_iter + 1):
        nk = q.sum(axis=0) + 1e-12
        means, cov = pooled_moments(q.T @ x, gram, nk, n, reg)
        prec_means = np.linalg.solve(cov, means.T)
        loglik = x @ prec_means - 0.5 * np.sum(means.T * prec_means, axis=0) + np.log(nk / n)
        logits = loglik + beta * (share @ q)
        new = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        change = float(np.abs(new - q).max())
        q = new
        if change < tol:
            break
    return q, steps


def main() -> None:
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    import spamask_integrate as si
    from spamask_integrate import mixture as M

    C = importlib.import_module("spamask_integrate.cluster")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--store", type=Path)
    ap.add_argument("--h5ad", type=Path)
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--n-components", type=int, default=None)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    if args.h5ad:  # one run's output: its caller input, graph and labels
        backed = ad.read_h5ad(args.h5ad, backed="r")
        params = backed.uns["spamask"]["run"] if "run" in backed.uns.get("spamask", {}) else {}
        batch_key = params.get("batch_key", "slice")
        label_key = params.get("label_key", "layer")
        k = int(backed.obs["domain"].nunique())
        adata = ad.AnnData(obs=backed.obs[[batch_key, label_key]].copy())
        adata.obsm["caller"] = np.asarray(backed.obsm["X_spamask_context_harmony"])
        adata.obsm["X_pca"] = np.asarray(backed.obsm["X_pca"])
        adata.obsp["spamask_connectivities"] = backed.obsp["spamask_connectivities"][:]
        del backed
        harmony = False
    else:
        data = PlanData(args.plan)
        adata, batch_key, label_key = data.adata, data.batch_key, data.label_key
        k, harmony = data.k, data.harmony
    n_fit = args.n_components or k
    order = np.argsort(adata.obs_names.to_numpy(dtype=str), kind="stable")  # as cluster()
    back = np.argsort(order)
    names = adata.obs[batch_key].astype(str).to_numpy()[order]
    share = M.neighbour_share(C.same_slice_neighbours(adata, batch_key)[order][:, order])
    labels = adata.obs[label_key].astype(str).to_numpy()
    slices = adata.obs[batch_key].astype(str).to_numpy()
    known = ~np.isin(labels, ["nan", "None", ""])

    def score(domains):  # mean over slices of the per-slice ARI, as the harness
        domains = domains[back]
        return float(np.mean([adjusted_rand_score(labels[m], domains[m])
                              for s in np.unique(slices) for m in [(slices == s) & known]]))

    def domains(q):
        lab = q.argmax(axis=1)
        if n_fit > k:
            lab = M.merge_components(q, adata.obsm["X_pca"], k, rows=order)[lab]
        return lab

    rows: dict = {}
    for seed in seed_list(args.seeds):
        if args.h5ad:
            rep = "caller"
        else:
            adata.obsm["X_spamask"] = stored_embedding(args.store, args.tag, seed)
            _, rep = si.caller_input(adata, batch_key, harmony=harmony, seed=seed)
        x = C.reduce(adata.obsm[rep][order], 30, seed)
        # the caller's own start (medoid of its starts, refitted above 20,000 spots), its
        # posteriors before the spatial EM
        _, _, start = C._gmm(x, n_fit, "EEE", seed, 200_000, names, M.N_STARTS, 0.0, None)
        row: dict = {}
        tic = time.perf_counter()
        q, steps = potts_em_before(x, share, start, C.SPATIAL_PRIOR)
        row["before_seconds"], row["before_steps"] = time.perf_counter() - tic, steps
        before = domains(q)
        tic = time.perf_counter()
        q, info = M.potts_em(x, share, start, C.SPATIAL_PRIOR)
        row["now_seconds"] = time.perf_counter() - tic
        row.update(info)
        now = domains(q)
        tic = time.perf_counter()
        q, info = M.potts_em(x, share, start, C.SPATIAL_PRIOR, max_iter=1000)
        row["converged_seconds"] = time.perf_counter() - tic
        row["converged_steps"], row["converged_at_1000"] = (info["potts_iterations"],
                                                            info["potts_converged"])
        converged = domains(q)
        row.update(same_domains=bool(np.array_equal(before, now)),
                   ari=score(now), ari_converged=score(converged),
                   spots_moved_by_convergence=int(np.count_nonzero(now != converged)))
        rows[str(seed)] = row
        print(seed, {a: (round(b, 4) if isinstance(b, float) else b) for a, b in row.items()},
              flush=True)
    got = list(rows.values())
    summary = {
        "same_domains": sum(r["same_domains"] for r in got), "of": len(got),
        "at_the_limit": sum(not r["potts_converged"] for r in got),
        "steps_to_convergence_max": max(r["converged_steps"] for r in got),
        "inputs_moved_by_convergence": sum(r["spots_moved_by_convergence"] > 0 for r in got),
        "spots_moved_by_convergence_max": max(r["spots_moved_by_convergence"] for r in got),
        "ari_mean": float(np.mean([r["ari"] for r in got])),
        "ari_converged_mean": float(np.mean([r["ari_converged"] for r in got])),
        "before_seconds_median": float(np.median([r["before_seconds"] for r in got])),
        "now_seconds_median": float(np.median([r["now_seconds"] for r in got])),
        "converged_seconds_median": float(np.median([r["converged_seconds"] for r in got]))}
    print(summary)
    name = args.name or f"potts_steps_{args.tag}" + (f"_{n_fit}" if n_fit > k else "")
    write_result(name, {"plan": args.plan, "h5ad": str(args.h5ad or ""), "seeds": args.seeds,
                        "n_domains": k, "n_components": n_fit, "n_starts": M.N_STARTS,
                        "summary": summary, "seeds_rows": rows})


if __name__ == "__main__":
    main()
