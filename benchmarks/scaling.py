"""Training scaling on synthetic slices: seconds per epoch, spots per second, peak RSS.

One (size, mode) per process, so each peak RSS is that run's own. Examples:
  python benchmarks/scaling.py --spots 10000 --mode full --epochs 5
  python benchmarks/scaling.py --spots 1000000 --mode minibatch --epochs 1
  python benchmarks/scaling.py --all            # the table in benchmarks/README.md
Results go to benchmarks/results/scaling_<spots>_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import RESULTS, peak_rss_gb, write_result

SIZES = [10_000, 100_000, 300_000, 1_000_000]


def one(spots: int, mode: str, epochs: int, slices: int, threads: int, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import spamask_integrate as si

    stages = {}
    tic = time.perf_counter()
    adata = si.datasets.synthetic_slices(slices, spots // slices, 300, 7, seed=0)
    stages["synthetic"] = time.perf_counter() - tic
    tic = time.perf_counter()
    si.preprocess(adata, n_top_genes=None, n_comps=200, min_cells=1)
    stages["preprocess"] = time.perf_counter() - tic
    tic = time.perf_counter()
    graph = si.build_graph(adata, k=12)
    stages["graph"] = time.perf_counter() - tic
    model = si.train(adata, graph, epochs=epochs, minibatch=(mode == "minibatch"),
                     batch_size=batch_size, device="cpu", quiet=False, seed=0)
    info = adata.uns["spamask"]["train"]
    per_epoch = float(sorted(model.history["seconds"])[len(model.history["seconds"]) // 2])
    return {"n_spots": adata.n_obs, "mode": mode, "epochs": epochs, "threads": threads,
            "batch_size": batch_size, "n_edges": int(graph.num_edges()),
            "seconds_per_epoch": per_epoch, "spots_per_second": adata.n_obs / per_epoch,
            "inference_seconds": float(info["inference_seconds"]), "stages": stages,
            "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=10_000)
    parser.add_argument("--mode", choices=["full", "minibatch"], default="minibatch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--all", action="store_true", help="run the whole table, one process each")
    args = parser.parse_args()
    if args.all:
        plan = [(n, m) for n in SIZES for m in ("full", "minibatch") if not
                (m == "full" and n > 300_000)]
        for n, m in plan:
            epochs = 3 if (m == "full" or n <= 100_000) else 1
            subprocess.run([sys.executable, __file__, "--spots", str(n), "--mode", m,
                            "--epochs", str(epochs), "--threads", str(args.threads)], check=False)
        rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("scaling_*.json"))]
        for r in sorted(rows, key=lambda r: (r["n_spots"], r["mode"])):
            print(f"{r['n_spots']:>9,} {r['mode']:>9}: {r['seconds_per_epoch']:8.1f} s/epoch "
                  f"{r['spots_per_second']:9.0f} spots/s  inference "
                  f"{r['inference_seconds']:6.1f} s  peak {r['peak_rss_gb']:5.2f} GB")
        return
    result = one(args.spots, args.mode, args.epochs, args.slices, args.threads, args.batch_size)
    print(json.dumps(result, indent=1))
    write_result(f"scaling_{result['n_spots']}_{args.mode}", result)


if __name__ == "__main__":
    main()
