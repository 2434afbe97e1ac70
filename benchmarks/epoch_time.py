"""Seconds per full-graph training epoch on the four shared DLPFC slices.

Setting of the speed target: 11,380 spots, PCA-200 input, 512/256 dims, kNN k=21, 2 threads.
Usage: python benchmarks/epoch_time.py [--epochs 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from _common import dlpfc_files, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=21)
    parser.add_argument("--edge-pairs-per-node", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import spamask_integrate as si

    adata = si.read_slices(dlpfc_files(), label_key="layer")
    si.preprocess(adata)
    graph = si.build_graph(adata, k=args.k)
    extra = {}
    if args.edge_pairs_per_node is not None:
        extra["edge_pairs_per_node"] = args.edge_pairs_per_node
    model = si.train(adata, graph, epochs=args.epochs, device="cpu", quiet=True, **extra)
    seconds = model.history["seconds"][3:]  # the first epochs warm up allocators
    result = {
        "n_spots": adata.n_obs, "n_edges": int(graph.num_edges()), "k": args.k,
        "input_dim": int(adata.obsm["X_pca"].shape[1]), "epochs": args.epochs,
        "threads": args.threads, "config": model.config.to_dict(),
        "median_s_per_epoch": statistics.median(seconds), "min_s_per_epoch": min(seconds),
        "max_s_per_epoch": max(seconds),
    }
    print(f"{adata.n_obs} spots, {graph.num_edges()} edges: median "
          f"{result['median_s_per_epoch']:.3f} s/epoch (min {result['min_s_per_epoch']:.3f}, "
          f"max {result['max_s_per_epoch']:.3f}) over {len(seconds)} epochs")
    write_result("epoch_time", result)


if __name__ == "__main__":
    main()
