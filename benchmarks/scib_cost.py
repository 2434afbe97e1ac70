"""Seconds of the scib-metrics step of ``evaluate`` against the number of spots it scores.

scib scores a seeded sample stratified by slice; its cost grows faster than linearly in the
sample (exact k = 90 neighbours per embedding, diffusion maps per label for kBET). This
measures ``metrics.scib_rows`` on samples of the prepared tiled data (the sample drawn from all
of it, so the slices per sample are those of the full data) with three embeddings, as
``run`` scores them: X_pca (PCA-200), a 256-d stand-in for X_spamask (a fixed random
projection of X_pca) and a 30-d stand-in for the Harmony embedding (its first 30 PCs).
The fitted model sizes the default scib sample (``metrics.SCIB_COST``).

Each sample size is scored in a fresh process, as a run scores it: the process-level costs
(importing umap and pynndescent, numba and JAX compiling) are paid by every point; the time
counts from the call of ``scib_rows`` (the data already read).

Usage: python benchmarks/scib_cost.py --spots 1000000 --samples 2000,4000,8000
       python benchmarks/scib_cost.py --spots 11380 --samples 2000,4000
Result: benchmarks/results/scib_cost_<spots>.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

from _common import write_result
from tiled import prepped


KEYS = ["X_pca", "X_spamask", "X_spamask_harmony"]


def point(n_spots: int, max_spots: int) -> dict:
    """scib_rows on a sample of ``max_spots`` spots, in this (fresh) process."""
    from spamask_integrate.metrics import scib_rows

    adata = prepped(n_spots)
    x = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    rng = np.random.default_rng(0)
    adata.obsm["X_spamask"] = x @ rng.standard_normal((x.shape[1], 256)).astype(np.float32)
    adata.obsm["X_spamask_harmony"] = x[:, :30].copy()
    tic = time.perf_counter()
    rows = scib_rows(adata, KEYS, "layer", "slice", pre_integrated_key="X_pca",
                     max_spots=max_spots, seed=0)
    seconds = time.perf_counter() - tic
    scored = [r["value"] for r in rows if r["metric"] == "scib_n_spots"][0]
    return {"max_spots": max_spots, "n_scored": int(scored), "seconds": seconds,
            "embeddings": len(KEYS), "n_slices": int(adata.obs["slice"].nunique())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--samples", default="2000,4000,8000")
    args = parser.parse_args()
    points = []
    ctx = mp.get_context("spawn")
    for n in [int(s) for s in args.samples.split(",")]:
        with ctx.Pool(1) as pool:
            points.append(pool.apply(point, (args.spots, n)))
        print(points[-1], flush=True)
    write_result(f"scib_cost_{args.spots}", {"n_spots": args.spots,
                                             "n_slices": points[0]["n_slices"],
                                             "fresh_process_per_point": True,
                                             "points": points})


if __name__ == "__main__":
    main()
