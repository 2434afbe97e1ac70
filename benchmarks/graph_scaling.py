"""Wall time and peak memory of synthetic_slices + build_graph up to 1,000,000 spots.

Usage: python benchmarks/graph_scaling.py [--spots 1000000] [--slices 12] [--genes 200]
Run each size in its own process so the peak RSS belongs to that size alone.
"""

from __future__ import annotations

import argparse
import time

from _common import peak_rss_gb, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--k", type=int, default=12)
    args = parser.parse_args()
    import spamask_integrate as si

    per_slice = args.spots // args.slices
    t0 = time.perf_counter()
    adata = si.datasets.synthetic_slices(args.slices, per_slice, args.genes, 7, seed=0)
    t1 = time.perf_counter()
    graph = si.build_graph(adata, k=args.k)
    t2 = time.perf_counter()
    result = {"n_spots": adata.n_obs, "n_slices": args.slices, "n_genes": args.genes,
              "k": args.k, "n_edges": int(graph.num_edges()), "nnz_counts": int(adata.X.nnz),
              "synthetic_seconds": t1 - t0, "graph_seconds": t2 - t1,
              "peak_rss_gb": peak_rss_gb()}
    print(f"{adata.n_obs:,} spots: synthetic {t1 - t0:.1f} s, build_graph {t2 - t1:.1f} s "
          f"({graph.num_edges():,} edges), peak RSS {result['peak_rss_gb']:.2f} GB")
    write_result(f"graph_scaling_{adata.n_obs}", result)


if __name__ == "__main__":
    main()
