"""Where the caller's own seed enters, and what one more K-component fit from its domains
would change. Run by hand; a what-if, not the default.

On each stored embedding (``model_ensembles.py train``) and for SpaMask's caller input as
``run`` builds it and smoothed PCA's (Harmony when the plan has it), the caller runs with
caller seeds s and s + 1000, three ways: K components (``n_components=None``), 2 K always
joined into K (``n_components=2K``) and the default check between the two (``"auto"``).
Per rule: the harness's score for each caller seed and the ARI between the two calls'
domains (1.0: the very same partition).

Then the what-if: from the default's domains, the Potts EM of a K-component EEE mixture
(the caller's own ``potts_em`` with its default prior strength, on the caller's PCA of its
input), started at those domains (each spot 0.98 in its domain). Where the check kept the
K components this changes (almost) nothing; where it kept the join, the joined domains are
refitted as K Gaussian components. Recorded as for the rules, and the Fisher ratio in the
model input (``obsm["X_pca"]``) and the pair coherence of the default's domains and of the
refit's.

Usage: python benchmarks/refit_domains.py PLAN --tag TAG --seeds 0-9 --store DIR [--name N]
Result: benchmarks/results/refit_domains_<tag>.json (or --name)
"""

from __future__ import annotations

import importlib

import numpy as np

from _common import (PlanData, caller_seed_rules, caller_seed_summary, print_caller_seed_row,
                     seed_list, stored_embedding, stored_embedding_parser, write_result)

RULES = ("K", "join", "check", "refit")


def main() -> None:
    import spamask_integrate as si

    cluster = importlib.import_module("spamask_integrate.cluster")
    mixture = importlib.import_module("spamask_integrate.mixture")
    args = stored_embedding_parser(__doc__).parse_args()
    data = PlanData(args.plan)
    adata, batch_key, k, order = data.adata, data.batch_key, data.k, data.order
    adj = data.neighbours()
    share = mixture.neighbour_share(adj)
    n_components = {"K": None, "join": 2 * k, "check": "auto"}
    rows = []
    for seed in seed_list(args.seeds):
        reps = data.caller_inputs(stored_embedding(args.store, args.tag, seed), seed)
        for method, key in reps.items():
            calls: dict = {rule: [] for rule in RULES}
            for caller_seed in (seed, seed + 1000):
                for rule, m in n_components.items():
                    si.cluster(adata, k, "gmm", use_rep=key, batch_key=batch_key,
                               seed=caller_seed, n_components=m, key_added="called")
                    calls[rule].append((adata.obs["called"].cat.codes.to_numpy(),
                                        data.score("called")))
                kept = bool(adata.uns["spamask"]["cluster"].get("merge_kept", False))
                x = data.caller_view(key, caller_seed)
                start = np.eye(k)[calls["check"][-1][0][order]] * 0.98 + 0.02 / k
                resp, em = mixture.potts_em(x, share, start, cluster.SPATIAL_PRIOR)
                refit = np.empty(adata.n_obs, dtype=np.int64)
                refit[order] = resp.argmax(axis=1)
                adata.obs["called"] = refit.astype(str)
                calls["refit"].append((refit, data.score("called")))
                if caller_seed == seed:
                    checked = calls["check"][0][0][order]
                    first = {"join_kept": kept, "refit_iterations": em["potts_iterations"],
                             "fisher_check_refit": mixture.fisher_ratios(
                                 adata.obsm["X_pca"], [checked, refit[order]], k, rows=order),
                             "coherence_check_refit": [cluster.pair_coherence(adj, checked),
                                                       cluster.pair_coherence(adj, refit[order])]}
            row = {"seed": seed, "method": method, **first}
            row.update(caller_seed_rules(calls))
            rows.append(row)
            print_caller_seed_row(seed, method, row, RULES)
    summary: dict = {}
    for method in ("spamask", "smoothed_pca"):
        mine = [r for r in rows if r["method"] == method]
        summary.update({f"{method} / {rule}": values for rule, values
                        in caller_seed_summary(mine, RULES).items()})
        summary[f"{method} / refit up"] = int(sum(r["refit"]["ari"] > r["check"]["ari"]
                                                  for r in mine))
    for name, values in summary.items():
        print(name, values)
    write_result(args.name or f"refit_domains_{args.tag}",
                 {"plan": args.plan, "tag": args.tag, "seeds": seed_list(args.seeds),
                  "n_domains": k, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
