"""Seconds per minibatch epoch with 1 vs N data-parallel processes (torch.distributed, gloo on
CPU, nccl on GPUs) on synthetic slices.

Usage: python benchmarks/ddp_scaling.py [--spots 300000] [--nproc 1 2] [--epochs 1]
On a multi-GPU machine: python benchmarks/ddp_scaling.py --device cuda --nproc 1 2 4 8
Results: benchmarks/results/ddp_scaling_<spots>.json
"""

from __future__ import annotations

import argparse
import time

from _common import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=300_000)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import spamask_integrate as si
    from spamask_integrate.distributed import train_distributed

    adata = si.datasets.synthetic_slices(args.slices, args.spots // args.slices, 300, 7, seed=0)
    si.preprocess(adata, n_top_genes=None, n_comps=200, min_cells=1)
    graph = si.build_graph(adata, k=12)
    rows = []
    for nproc in args.nproc:
        config = si.SpamaskConfig(epochs=args.epochs, batch_size=args.batch_size, seed=0,
                                  device=args.device, minibatch=True)
        tic = time.perf_counter()
        if nproc == 1:
            model = si.train(adata, graph, config=config)
        else:
            model = train_distributed(adata, "slice", config, nproc=nproc)
        wall = time.perf_counter() - tic
        per_epoch = sum(model.history["seconds"]) / len(model.history["seconds"])
        rows.append({"nproc": nproc, "seconds_per_epoch": per_epoch,
                     "spots_per_second": adata.n_obs / per_epoch, "wall_seconds": wall})
        print(f"{nproc} process(es): {per_epoch:.1f} s/epoch, "
              f"{adata.n_obs / per_epoch:,.0f} spots/s (wall {wall:.1f} s with start-up)")
    write_result(f"ddp_scaling_{adata.n_obs}", {"n_spots": adata.n_obs, "n_edges":
                                                int(graph.num_edges()), "device": args.device,
                                                "rows": rows})


if __name__ == "__main__":
    main()
