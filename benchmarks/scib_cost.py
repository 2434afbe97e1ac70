"""Seconds of the scib-metrics step of ``evaluate`` against the number of spots it scores.

scib scores a seeded sample stratified by slice; its cost grows faster than linearly in the
sample (exact k = 90 neighbours per embedding, diffusion maps per label for kBET). This
measures ``metrics.scib_rows`` on samples of the prepared tiled data (the sample drawn from all
of it, so the slices per sample are those of the full data) with three embeddings, as
``run`` scores them: X_pca (PCA-200), a 256-d stand-in for X_spamask (a fixed random
projection of X_pca) and a 30-d stand-in for the Harmony embedding (its first 30 PCs).
The fitted model sizes the default scib sample (``metrics.SCIB_COST``).

Usage: python benchmarks/scib_cost.py --spots 1000000 --samples 2000,4000,8000
Result: benchmarks/results/scib_cost_<spots>.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import write_result
from tiled import prepped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--samples", default="2000,4000,8000")
    args = parser.parse_args()
    from spamask_integrate.metrics import scib_rows

    adata = prepped(args.spots)
    x = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    rng = np.random.default_rng(0)
    adata.obsm["X_spamask"] = x @ rng.standard_normal((x.shape[1], 256)).astype(np.float32)
    adata.obsm["X_spamask_harmony"] = x[:, :30].copy()
    keys = ["X_pca", "X_spamask", "X_spamask_harmony"]
    points = []
    for n in [int(s) for s in args.samples.split(",")]:
        tic = time.perf_counter()
        rows = scib_rows(adata, keys, "layer", "slice", pre_integrated_key="X_pca",
                         max_spots=n, seed=0)
        seconds = time.perf_counter() - tic
        scored = [r["value"] for r in rows if r["metric"] == "scib_n_spots"][0]
        points.append({"max_spots": n, "n_scored": int(scored), "seconds": seconds,
                       "embeddings": len(keys)})
        print(points[-1], flush=True)
    write_result(f"scib_cost_{adata.n_obs}", {"n_spots": adata.n_obs,
                                              "n_slices": int(adata.obs["slice"].nunique()),
                                              "points": points})


if __name__ == "__main__":
    main()
