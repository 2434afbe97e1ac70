"""The whole pipeline (``spamask_integrate.run``) on synthetic slices, with seconds per stage
and peak RSS: read is replaced by generating the data in memory.

Usage: python benchmarks/run_1m.py [--spots 1000000] [--epochs 1] [--out /tmp/run_1m]
Results: benchmarks/results/run_<spots>.json
"""

from __future__ import annotations

import argparse
import time

from _common import peak_rss_gb, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default="/tmp/run_1m")
    args = parser.parse_args()
    import spamask_integrate as si

    tic = time.perf_counter()
    adata = si.datasets.synthetic_slices(args.slices, args.spots // args.slices, 300, 7, seed=0)
    synthetic = time.perf_counter() - tic
    adata = si.run(adata, args.out, label_key="ground_truth", n_domains=7, k=12,
                   preprocess_kwargs={"n_top_genes": None, "n_comps": 200, "min_cells": 1},
                   epochs=args.epochs, seed=0)
    total = time.perf_counter() - tic
    seconds = {"synthetic": synthetic, **dict(adata.uns["spamask"]["run"]["seconds"])}
    slowest = max(seconds, key=seconds.get)
    table = si.evaluate(adata, "ground_truth", scib=False)
    ari = table[(table.metric == "ARI") & (table.scope == "all")].value.iloc[0]
    result = {"n_spots": adata.n_obs, "epochs": args.epochs, "seconds": seconds,
              "total_seconds": total, "slowest_stage": slowest,
              "slowest_share": seconds[slowest] / total, "peak_rss_gb": peak_rss_gb(),
              "ari_all": float(ari)}
    print(result)
    write_result(f"run_{adata.n_obs}", result)


if __name__ == "__main__":
    main()
