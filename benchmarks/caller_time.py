"""Seconds of the domain caller (``cluster`` with its defaults) against a plain one-start GMM,
at growing spot counts, on synthetic embeddings (30 dims, 7 layered domains, 12 slices).

The caller fits its starts (the default number, or ``--n-starts``) on a sample of at most
20,000 spots and runs the Potts EM over the sparse graph, so its cost should grow linearly
in spots. Since 2026-12-07 the default caller fits K and 2 K components (the 2 K joined into
K in ``obsm["X_pca"]``, here a synthetic 50-dimensional expression view of the same domains,
and in its input) and keeps K only if the join loses in space and in expression; the plain
GMM is one start of K components. ``--n-components M`` also times M components, always joined. It also records
the iterations of the caller's spatial (Potts) EM.

Usage: python benchmarks/caller_time.py --spots 11380 100000 1000000 [--n-starts N]
       [--n-components M] [--tag T]
Result: benchmarks/results/caller_time_<spots>[_<T>].json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import peak_rss_gb, write_result


def synthetic_embedding(n_spots: int, n_slices: int = 12, dims: int = 30, noise: float = 1.3,
                        seed: int = 0):
    import anndata as ad
    import pandas as pd

    import spamask_integrate as si
    from spamask_integrate.datasets import _layout

    rng = np.random.default_rng(seed)
    per = n_spots // n_slices
    xy, dom = zip(*(_layout(per, 7, rng, phase=0.3 * s) for s in range(n_slices)))
    truth = np.concatenate(dom)
    centres = rng.normal(0, 1, (7, dims))
    obs = pd.DataFrame({"slice": pd.Categorical(np.repeat([f"s{i}" for i in range(n_slices)],
                                                          per)),
                        "truth": truth}, index=[f"spot{i}" for i in range(per * n_slices)])
    adata = ad.AnnData(obs=obs)
    adata.obsm["spatial"] = np.concatenate(xy)
    adata.obsm["X_emb"] = (centres[truth] + rng.normal(0, noise, (len(truth), dims))
                           ).astype(np.float32)
    genes = rng.normal(0, 1, (7, 50))  # the merge's reference: an expression view
    adata.obsm["X_pca"] = (genes[truth] + rng.normal(0, 2.0, (len(truth), 50))
                           ).astype(np.float32)
    si.build_graph(adata, k=12)
    return adata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, nargs="+", default=[11_380, 100_000, 1_000_000])
    parser.add_argument("--n-starts", type=int, default=None,
                        help="the caller's GMM starts (default: the library's default)")
    parser.add_argument("--n-components", type=int, default=None,
                        help="also time the caller with this many components, merged to 7")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    import spamask_integrate as si
    from sklearn.metrics import adjusted_rand_score

    for n in args.spots:
        adata = synthetic_embedding(n)
        starts = args.n_starts or si.mixture.N_STARTS
        row = {"n_spots": adata.n_obs, "n_starts": starts}
        runs = [("plain_gmm", {"n_starts": 1, "spatial_prior": 0.0, "n_components": None}),
                ("caller", {"n_starts": starts})]  # the default caller (since 2026-12-07: K
        # and 2 K components; K kept only if the join loses in space and in expression)
        if args.n_components:
            row["n_components"] = args.n_components
            runs.append(("merge", {"n_starts": starts, "n_components": args.n_components}))
        for name, opts in runs:
            tic = time.perf_counter()
            si.cluster(adata, 7, use_rep="X_emb", seed=0, **opts)
            row[f"{name}_seconds"] = time.perf_counter() - tic
            row[f"{name}_ari"] = adjusted_rand_score(adata.obs["truth"], adata.obs["domain"])
            record = adata.uns["spamask"]["cluster"]
            if "merge_kept" in record:  # the default's check: joined components kept?
                row[f"{name}_merge_kept"] = bool(record["merge_kept"])
            if "potts_iterations" in record:  # the spatial EM: steps taken, and converged?
                for key in ("potts_iterations", "potts_converged", "potts_switched"):
                    row[f"{name}_{key}"] = record[key]
        row["added_seconds"] = row["caller_seconds"] - row["plain_gmm_seconds"]
        row["peak_rss_gb"] = peak_rss_gb()
        print(f"{n:,} spots: plain GMM {row['plain_gmm_seconds']:.1f} s (ARI "
              f"{row['plain_gmm_ari']:.3f}), caller {row['caller_seconds']:.1f} s (ARI "
              f"{row['caller_ari']:.3f}), adds {row['added_seconds']:.1f} s" +
              (f"; with {args.n_components} components merged {row['merge_seconds']:.1f} s "
               f"(ARI {row['merge_ari']:.3f})" if args.n_components else ""))
        write_result(f"caller_time_{adata.n_obs}" + (f"_{args.tag}" if args.tag else ""), row)


if __name__ == "__main__":
    main()
