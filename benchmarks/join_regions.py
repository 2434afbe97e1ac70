"""What the caller's 2 K join does to each region, for SpaMask and smoothed PCA. Run by hand.

On each stored embedding (``model_ensembles.py train``) the caller runs three times on
SpaMask's input as ``run`` builds it and on smoothed PCA's (Harmony when the plan has it):
with K components (``n_components=None``), with 2 K components always joined into K
(``n_components=2K``) and with the default check between the two (``"auto"``). For each
call it records the harness's score (mean over slices of the per-slice ARI) and, for every
labelled region, the F1 score of the domain that matches it best (pooled over slices): which
regions the join mends and which it costs.

Usage: python benchmarks/join_regions.py PLAN --tag TAG --seeds 0-9 --store DIR [--name N]
Result: benchmarks/results/join_regions_<tag>.json (or --name)
"""

from __future__ import annotations

import numpy as np

from _common import PlanData, seed_list, stored_embedding, stored_embedding_parser, write_result


def best_f1(labels: np.ndarray, domains: np.ndarray) -> dict[str, float]:
    """For each region of ``labels``, the F1 score of its best-matching domain."""
    out = {}
    for region in np.unique(labels):
        truth = labels == region
        both = np.bincount(domains[truth], minlength=domains.max() + 1)
        sizes = np.bincount(domains, minlength=domains.max() + 1)
        out[str(region)] = float(np.max(2.0 * both / (truth.sum() + sizes)))
    return out


def main() -> None:
    import spamask_integrate as si

    args = stored_embedding_parser(__doc__).parse_args()
    data = PlanData(args.plan)
    adata, batch_key, k = data.adata, data.batch_key, data.k
    labels = adata.obs[data.label_key].astype(str).to_numpy()
    known = ~np.isin(labels, ["nan", "None", ""])
    rules = {"K": None, "join": 2 * k, "check": "auto"}
    rows = []
    for seed in seed_list(args.seeds):
        reps = data.caller_inputs(stored_embedding(args.store, args.tag, seed), seed)
        for method, key in reps.items():
            for rule, n_components in rules.items():
                si.cluster(adata, k, "gmm", use_rep=key, batch_key=batch_key, seed=seed,
                           n_components=n_components, key_added="joined")
                domains = adata.obs["joined"].cat.codes.to_numpy()
                rows.append({"seed": seed, "method": method, "rule": rule,
                             "ari": data.score("joined"),
                             "f1": best_f1(labels[known], domains[known])})
        print(seed, ", ".join(f"{r['method']} {r['rule']} {r['ari']:.3f}"
                              for r in rows if r["seed"] == seed), flush=True)
    summary: dict = {}
    for method in ("spamask", "smoothed_pca"):
        for rule in rules:
            mine = [r for r in rows if r["method"] == method and r["rule"] == rule]
            summary[f"{method} / {rule}"] = {
                "ari": float(np.mean([r["ari"] for r in mine])),
                "f1": {region: float(np.mean([r["f1"][region] for r in mine]))
                       for region in mine[0]["f1"]}}
    for name, values in summary.items():
        print(f"{name}: ARI {values['ari']:.3f}; "
              + ", ".join(f"{region} {f:.3f}" for region, f in values["f1"].items()))
    write_result(args.name or f"join_regions_{args.tag}",
                 {"plan": args.plan, "tag": args.tag, "seeds": seed_list(args.seeds),
                  "n_domains": k, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
