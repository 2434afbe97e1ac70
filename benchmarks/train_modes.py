"""Training throughput of each mode on the tiled DLPFC data (defaults otherwise).

Full graph, spatial tile subgraphs (Cluster-GCN style, the default above the minibatch
threshold) and neighbour-sampled minibatches, each for ``--epochs`` passes over all spots
after one warm-up step of its own; spots per second per pass = n_spots / median seconds of an
epoch (the epoch includes drawing the masks and building every step's graph).
Subgraph settings are reported with the halo overhead (nodes in the step graphs / core nodes).

Usage: python benchmarks/train_modes.py --spots 1000000 --modes subgraph,neighbor [--epochs 1]
Result: benchmarks/results/train_modes_<spots>.json (runs of other modes are kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from _common import RESULTS, peak_rss_gb, write_result
from tiled import prepped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--modes", default="subgraph,neighbor")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subgraph-size", type=int, default=None)
    parser.add_argument("--subgraph-tile-size", type=int, default=None)
    parser.add_argument("--halo", type=int, default=None)
    args = parser.parse_args()
    import spamask_integrate as si
    from spamask_integrate.graph import to_dgl
    from spamask_integrate.train import SpaMask, Trainer, seed_all, training_tiles

    adata = prepped(args.spots)
    graph = to_dgl(adata, "slice")
    x = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    path = RESULTS / f"train_modes_{adata.n_obs}.json"
    result = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for mode in args.modes.split(","):
        extra = {k: v for k, v in (("subgraph_size", args.subgraph_size),
                                    ("subgraph_tile_size", args.subgraph_tile_size),
                                    ("halo", args.halo)) if v is not None}
        config = si.SpamaskConfig(quiet=True, device="cpu", epochs=args.epochs, seed=0,
                                  minibatch=mode != "full",
                                  sampler="neighbor" if mode == "neighbor" else "subgraph",
                                  **extra)
        seed_all(0)
        model = SpaMask(config, x.shape[1])
        tiles = training_tiles(adata, config, "slice") if mode != "full" else None
        tic = time.perf_counter()
        trainer = Trainer(model, graph, x, torch.device("cpu"), minibatch=mode != "full",
                          tiles=tiles)
        setup = time.perf_counter() - tic
        overhead = None
        if mode == "subgraph":
            groups = trainer.subgraphs.groups(torch.Generator().manual_seed(0))
            sizes = [trainer.subgraphs.nodes_around(g).numel() for g in groups[:20]]
            overhead = sum(sizes) / sum(g.numel() for g in groups[:20])
        trainer.fit()
        seconds = model.history["seconds"]
        med = statistics.median(seconds)
        name = mode if not extra else mode + "_" + "_".join(f"{k}{v}" for k, v in extra.items())
        result["runs"][name] = {
            "mode": mode, "config": config.to_dict(), "setup_seconds": setup,
            "seconds_per_epoch": seconds, "median_seconds_per_epoch": med,
            "spots_per_second": adata.n_obs / med, "halo_overhead": overhead,
            "peak_rss_gb": peak_rss_gb(),
            "final_loss": model.history["loss"][-1]}
        print(f"{mode} {extra}: {med:.1f} s/epoch, {adata.n_obs / med:,.0f} spots/s, "
              f"halo x{overhead}", flush=True)
    result["n_spots"] = adata.n_obs
    write_result(f"train_modes_{adata.n_obs}", {k: v for k, v in result.items()
                                                  if k != "machine"})


if __name__ == "__main__":
    main()
