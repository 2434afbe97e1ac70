"""The caller with sklearn's ``GaussianMixture`` (before 2026-12-06) and with its own
``TiedGaussianMixture`` (one product with the precision factor for all components): the same
domains, and how much faster, on the stored embeddings of today's defaults.

Prepares a plan's first dataset as the harness does, loads each seed's embedding stored by
``model_ensembles.py train``, builds the caller's input as ``run`` does (``caller_input``: the
context block, Harmony when the plan has it; then PCA-30), then runs the caller (120 starts,
Potts EM) with each mixture class, with K components and with 2 K components joined into K in ``X_pca``
(the opt-in merge). Records per seed whether the two give the same domains spot for spot and
the same agreement among the starts, and the seconds per call, one call after the other.

Usage: python benchmarks/tied_density.py benchmarks/plans/dlpfc_default.yaml --tag dlpfc
           --seeds 0-9 --store /tmp/cstore
Result: benchmarks/results/tied_density_<tag>.json (or --name)
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from _common import PlanData, seed_list, stored_embedding, stored_embedding_parser, write_result


def main() -> None:
    import spamask_integrate as si
    from sklearn.mixture import GaussianMixture
    from spamask_integrate import mixture as M

    C = importlib.import_module("spamask_integrate.cluster")
    ap = stored_embedding_parser(__doc__)
    args = ap.parse_args()
    data = PlanData(args.plan)
    adata, batch_key, k, harmony = data.adata, data.batch_key, data.k, data.harmony
    order, names = data.order, data.names
    share = M.neighbour_share(data.neighbours())
    ours = M.TiedGaussianMixture  # fit_gmm builds this class; sklearn's is the fit of before
    rows: dict = {}
    try:
        for seed in seed_list(args.seeds):
            adata.obsm["X_spamask"] = stored_embedding(args.store, args.tag, seed)
            _, rep = si.caller_input(adata, batch_key, harmony=harmony, seed=seed)
            x = data.caller_view(rep, seed)
            row = {}
            for n in (k, 2 * k):
                calls = {}
                for which, mixture in (("sklearn", GaussianMixture), ("ours", ours)):
                    M.TiedGaussianMixture = mixture
                    tic = time.perf_counter()
                    labels, info, resp = C._gmm(x, n, "EEE", seed, 200_000, names,
                                                M.N_STARTS, C.SPATIAL_PRIOR, share)
                    if n > k:
                        labels = M.merge_components(resp, adata.obsm["X_pca"], k,
                                                    rows=order)[labels]
                    calls[which] = (time.perf_counter() - tic, labels, info["start_agreement"])
                M.TiedGaussianMixture = ours
                row[str(n)] = {
                    "same_domains": bool(np.array_equal(calls["sklearn"][1], calls["ours"][1])),
                    "same_start_agreement": calls["sklearn"][2] == calls["ours"][2],
                    "sklearn_seconds": calls["sklearn"][0], "ours_seconds": calls["ours"][0]}
            rows[str(seed)] = row
            print(seed, {n: (r["same_domains"], round(r["sklearn_seconds"], 1),
                             round(r["ours_seconds"], 1)) for n, r in row.items()}, flush=True)
    finally:
        M.TiedGaussianMixture = ours
    summary = {}
    for n in (str(k), str(2 * k)):
        got = [r[n] for r in rows.values()]
        summary[n] = {"same_domains": sum(r["same_domains"] for r in got),
                      "same_start_agreement": sum(r["same_start_agreement"] for r in got),
                      "of": len(got)}
        for which in ("sklearn", "ours"):
            summary[n][f"{which}_seconds_median"] = float(
                np.median([r[f"{which}_seconds"] for r in got]))
        print(f"{n} components: the same domains on {summary[n]['same_domains']} of {len(got)}, "
              f"sklearn {summary[n]['sklearn_seconds_median']:.1f} s, ours "
              f"{summary[n]['ours_seconds_median']:.1f} s a call (medians)")
    write_result(args.name or f"tied_density_{args.tag}",
                 {"plan": args.plan, "seeds": args.seeds, "n_domains": k,
                  "n_starts": M.N_STARTS, "summary": summary, "seeds_rows": rows})


if __name__ == "__main__":
    main()
