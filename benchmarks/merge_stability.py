"""Can the caller's starts tell it when to join 2 K components into K (the opt-in merge) and
when to keep K? A label-free stability test, on stored embeddings.

The opt-in merge (``cluster(..., n_components=2 K)``) raises the DLPFC slices and lowers the
osmFISH section (benchmarks/README.md, "More components than domains"). A rule that picks
between the two from the data alone would need a score that is higher for the merge on
DLPFC and lower on osmFISH. This script measures one candidate, the agreement of the
caller's starts (the stability of a clustering over restarts, as consensus clustering uses
it to choose K): with K components, the mean ARI among the 120 starts (what ``cluster``
records as ``start_agreement``); with 2 K components, the same among the starts after each
is joined into K groups by ``merge_components`` in ``X_pca`` (on the caller's 3,000-spot
probe). The rule "merge when the merged starts agree more" is then scored against the labels.

Prepares a plan's first dataset as the harness does, loads each seed's embedding stored by
``model_ensembles.py train``, builds the caller's input as ``run`` does (``caller_input``),
then runs ``cluster`` with K and with ``n_components=2 K`` (both scored as the harness scores),
and refits the 2 K starts to join each one (the same seeds and sample as ``cluster``'s).
It also records how many iterations the caller's spatial (Potts) EM took in both calls.

Usage: python benchmarks/merge_stability.py benchmarks/plans/dlpfc_default.yaml --tag dlpfc
           --seeds 0-9 --store /tmp/cstore
Result: benchmarks/results/merge_stability_<tag>.json (or --name)
"""

from __future__ import annotations

import numpy as np

from _common import PlanData, seed_list, stored_embedding, stored_embedding_parser, write_result


def main() -> None:
    import spamask_integrate as si
    from spamask_integrate import mixture as M

    ap = stored_embedding_parser(__doc__)
    args = ap.parse_args()
    data = PlanData(args.plan)
    adata, batch_key, k, order = data.adata, data.batch_key, data.k, data.order
    ref = np.asarray(adata.obsm["X_pca"])[order]
    score = data.score

    def off_diagonal_mean(agree: np.ndarray) -> float:
        return float(agree[~np.eye(len(agree), dtype=bool)].mean())

    rows: dict = {}
    for seed in seed_list(args.seeds):
        adata.obsm["X_spamask"] = stored_embedding(args.store, args.tag, seed)
        _, rep = si.caller_input(adata, batch_key, harmony=data.harmony, seed=seed)
        si.cluster(adata, k, "gmm", use_rep=rep, batch_key=batch_key, seed=seed,
                   n_components=None)  # K components, no merge
        agree_k = adata.uns["spamask"]["cluster"]["start_agreement"]
        potts_k = adata.uns["spamask"]["cluster"]["potts_iterations"]
        ari_k = score("domain")
        si.cluster(adata, k, "gmm", use_rep=rep, batch_key=batch_key, seed=seed,
                   n_components=2 * k, key_added="merged")
        agree_2k = adata.uns["spamask"]["cluster"]["start_agreement"]
        potts_2k = adata.uns["spamask"]["cluster"]["potts_iterations"]
        ari_merged = score("merged")
        # the 2 K starts again, as medoid_start fits them, each joined into K on the probe
        x = data.caller_view(rep, seed)
        fit_idx = M.stratified_sample(data.names, 20_000, seed)
        fits = M.fit_starts(x[fit_idx], 2 * k, "EEE", M.start_seeds(seed, M.N_STARTS))
        probe = M.stratified_sample(data.names, 3000, seed + 1)
        joined = []
        for fit in fits:
            resp = fit.predict_proba(x[probe])
            joined.append(M.merge_components(resp, ref[probe], k)[resp.argmax(axis=1)])
        agree_joined = off_diagonal_mean(M.pairwise_ari(np.stack(joined), k))
        rows[str(seed)] = {"ari_k": ari_k, "ari_merged": ari_merged, "agree_k": agree_k,
                           "agree_2k": agree_2k, "agree_joined": agree_joined,
                           "potts_iterations_k": potts_k, "potts_iterations_2k": potts_2k}
        print(seed, {a: round(float(b), 4) for a, b in rows[str(seed)].items()}, flush=True)
    got = {key: np.array([r[key] for r in rows.values()], dtype=float)
           for key in next(iter(rows.values()))}
    pick_merge = got["agree_joined"] > got["agree_k"]
    picked = np.where(pick_merge, got["ari_merged"], got["ari_k"])
    summary = {key: {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
               for key, v in got.items()}
    summary["rule"] = {"merge_chosen": int(pick_merge.sum()), "of": len(picked),
                       "mean": float(picked.mean()),
                       "sd": float(picked.std(ddof=1)) if len(picked) > 1 else 0.0,
                       "merge_helps": int((got["ari_merged"] > got["ari_k"]).sum())}
    for key, s in summary.items():
        print(key, s)
    write_result(args.name or f"merge_stability_{args.tag}",
                 {"plan": args.plan, "seeds": args.seeds, "n_domains": k,
                  "n_starts": M.N_STARTS, "summary": summary, "seeds_rows": rows})


if __name__ == "__main__":
    main()
