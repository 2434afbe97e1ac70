"""What each piece of the domain caller does, on embeddings that are already trained.

For every ``integrated.h5ad`` given (e.g. the outputs of ``spamask-integrate run`` with
different seeds), ``cluster()`` is run with the same K on the same embedding in five ways:

- ``one start``: a plain EEE GMM (``n_starts=1, spatial_prior=0``), caller seeds 0..S-1;
- ``one start + refine``: the same, then the majority vote over same-slice neighbours;
- ``medoid``: 20 starts, the medoid start, no spatial prior;
- ``medoid + refine``: the same, then the majority vote;
- ``caller``: the default (medoid + Potts-prior EM).

Scores are the mean per-slice ARI against ``--label-key``. Writes
``results/caller_ablation_<name>.json`` with every number.
Usage: python benchmarks/caller_ablation.py --name dlpfc --label-key layer --k 7 RUN1/integrated.h5ad ...
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import write_result


def _mean_slice_ari(adata, label_key: str) -> float:
    from sklearn.metrics import adjusted_rand_score

    truth = adata.obs[label_key].astype(str).to_numpy()
    dom = adata.obs["domain"].astype(str).to_numpy()
    slices = adata.obs["slice"].astype(str).to_numpy()
    keep = truth != "nan"
    return float(np.mean([adjusted_rand_score(truth[keep & (slices == s)],
                                              dom[keep & (slices == s)])
                          for s in np.unique(slices)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--label-key", required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--starts", type=int, default=5,
                        help="caller seeds for the one-start rows (default 5)")
    args = parser.parse_args()
    import anndata as ad

    import spamask_integrate as si

    ways = {"one start": dict(n_starts=1, spatial_prior=0.0),
            "one start + refine": dict(n_starts=1, spatial_prior=0.0, refine=True),
            "medoid": dict(spatial_prior=0.0),
            "medoid + refine": dict(spatial_prior=0.0, refine=True),
            "caller": {}}
    rows = []
    for path in args.files:
        adata = ad.read_h5ad(path)
        row = {"file": path}
        for way, opts in ways.items():
            seeds = range(args.starts) if way.startswith("one start") else [0]
            scores = []
            for seed in seeds:
                si.cluster(adata, args.k, seed=seed, **opts)
                scores.append(_mean_slice_ari(adata, args.label_key))
            row[way] = scores
        print(path, {w: [round(v, 3) for v in s] for w, s in row.items() if w != "file"})
        rows.append(row)
    summary = {}
    for way in ways:
        per_emb = np.array([np.mean(r[way]) for r in rows])
        every = np.concatenate([r[way] for r in rows])
        summary[way] = {"mean": float(per_emb.mean()), "sd_over_embeddings": float(per_emb.std(ddof=1)),
                        "min": float(every.min()), "max": float(every.max())}
        print(f"{way:>20}: {summary[way]['mean']:.3f} ± {summary[way]['sd_over_embeddings']:.3f}"
              f"  (every fit {summary[way]['min']:.3f}-{summary[way]['max']:.3f})")
    write_result(f"caller_ablation_{args.name}", {"k": args.k, "label_key": args.label_key,
                                                  "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
