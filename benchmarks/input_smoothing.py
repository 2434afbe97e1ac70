"""Does a wider neighbourhood in the model input help? A screen, run by hand.

The domain-calling issue asks what the encoder's receptive field covers on single-cell data.
Each variant trains SpaMask with today's defaults (the benchmark harness's preprocessing,
graph, training, Harmony on several slices, the default caller, K from the data) on another
model input:

- ``default``: PCA-200 of the preprocessing, as every run;
- ``concat_<h>``: that PCA beside its mean over each spot and its graph neighbourhood, ``h``
  hops of a random walk with self-loops (``baselines.smoothed_pca``), 400 columns;
- ``smoothed_<h>``: the smoothed PCA alone;
- ``pca`` and ``smoothed_pca`` (no SpaMask; ``synthetic`` only): the peers on the same caller.

Data: ``dlpfc`` (four slices, K = 7), ``osmfish`` (one section, K = 11, "Excluded" dropped)
and ``synthetic``: three sections of 5,000 cells at uniformly random positions, 150 genes,
8 cell types with their own markers, and K = 4 wavy bands that differ only in their mix of
cell types (Dirichlet(0.7) proportions). A cell's own expression tells its type, not its
band; only its neighbourhood does: a domain at single-cell resolution.

Usage: python benchmarks/input_smoothing.py osmfish --variants default,concat_2 --seeds 0-9
       python benchmarks/input_smoothing.py dlpfc --field   (what the graph's hops reach)
Result: benchmarks/results/input_smoothing_<data>.json (rows added to what is there),
        benchmarks/results/receptive_field_<data>.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from _common import RESULTS, SHARED, dlpfc_files, machine, seed_list


def single_cell_sections(seed: int = 0, n_sections: int = 3, n_cells: int = 5000,
                         n_genes: int = 150, n_types: int = 8, n_domains: int = 4) -> ad.AnnData:
    """Sections whose domains are mixes of cell types (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    profile = np.ones((n_types, n_genes))
    for t in range(n_types):
        profile[t, rng.choice(n_genes, 12, replace=False)] *= 8.0
    profile *= rng.lognormal(0, 0.5, n_genes)
    mix = rng.dirichlet(np.full(n_types, 0.7), size=n_domains)
    parts = []
    for s in range(n_sections):
        r = np.random.default_rng([seed, s])
        xy = r.uniform(0, 100, (n_cells, 2))
        wave = xy[:, 1] + 4 * np.sin(xy[:, 0] / 15 + r.uniform(0, 2 * np.pi))
        domain = np.clip(np.floor(wave / (100 / n_domains)).astype(int), 0, n_domains - 1)
        cell_type = np.array([r.choice(n_types, p=mix[d]) for d in domain])
        depth = r.lognormal(np.log(200), 0.4, n_cells)
        mean = profile[cell_type] * r.lognormal(0, 0.3, n_genes)  # a section effect
        mean = mean / mean.sum(1, keepdims=True) * depth[:, None]
        part = ad.AnnData(sp.csr_matrix(r.poisson(mean).astype(np.int32)), obs=pd.DataFrame(
            {"slice": f"section{s}", "truth": domain.astype(str), "cell_type": cell_type.astype(str)},
            index=[f"section{s}_{i}" for i in range(n_cells)]))
        part.obsm["spatial"] = xy
        part.var_names = [f"gene{i}" for i in range(n_genes)]
        parts.append(part)
    adata = ad.concat(parts)
    adata.obs["slice"] = adata.obs["slice"].astype("category")
    return adata


def load(data: str):
    """(AnnData as read, label column, K, Harmony or not)."""
    from spamask_integrate.io import read_slices

    if data == "dlpfc":
        return read_slices(dlpfc_files(), label_key="layer"), "layer", 7, True
    if data == "osmfish":
        adata = read_slices([SHARED / "osmfish_sscortex" / "osmFISH_all_cells.h5ad"],
                            label_key="Region")
        keep = (adata.obs["Region"].astype(str) != "Excluded").to_numpy()
        return adata[keep].copy(), "Region", 11, False
    return single_cell_sections(), "truth", 4, True


def receptive_field(adata: ad.AnnData, label: str, max_hops: int = 4) -> list[dict]:
    """Per hop of the default graph: the median count of spots within reach (the spot
    itself included), the median largest distance to them and the mean share that carries
    the spot's label; distances in units of the median over labels of the median distance
    from a spot to the nearest spot of another label. One slice at a time (the first)."""
    from sklearn.neighbors import KDTree

    from spamask_integrate.graph import build_graph

    first = adata.obs["slice"].cat.categories[0]
    one = adata[(adata.obs["slice"] == first).to_numpy()].copy()
    build_graph(one, "slice")
    step = (one.obsp["spamask_connectivities"] > 0).astype(np.float32) + sp.identity(
        one.n_obs, format="csr", dtype=np.float32)
    xy = np.asarray(one.obsm["spatial"], dtype=np.float64)[:, :2]
    labels = one.obs[label].astype(str).to_numpy()
    unit = float(np.median([np.median(KDTree(xy[labels != lab]).query(xy[labels == lab])[0])
                            for lab in np.unique(labels)]))
    reach, rows = step.tocsr(), []
    for hops in range(1, max_hops + 1):
        if hops > 1:
            reach = (reach @ step).tocsr()
            reach.data[:] = 1
        sizes = np.diff(reach.indptr)
        src = np.repeat(np.arange(one.n_obs), sizes)
        dist = np.linalg.norm(xy[src] - xy[reach.indices], axis=1)
        same = np.add.reduceat((labels[src] == labels[reach.indices]).astype(float),
                               reach.indptr[:-1]) / sizes
        rows.append({"hops": hops, "in_reach": float(np.median(sizes)),
                     "radius": float(np.median(np.maximum.reduceat(dist, reach.indptr[:-1])))
                     / unit, "same_label": float(same.mean()), "unit": unit,
                     "slice": str(first)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", choices=["dlpfc", "osmfish", "synthetic"])
    p.add_argument("--variants", default="default,concat_2")
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--field", action="store_true",
                   help="only measure what the encoder's two hops reach, per hop")
    args = p.parse_args()
    if args.field:
        adata, label, _, _ = load(args.data)
        out = RESULTS / f"receptive_field_{args.data}.json"
        out.write_text(json.dumps({"machine": machine(), "data": args.data,
                                   "rows": receptive_field(adata, label)}, indent=1))
        print(f"wrote {out}")
        return

    from spamask_integrate.baselines import smoothed_pca
    from spamask_integrate.cluster import cluster
    from spamask_integrate.graph import build_graph
    from spamask_integrate.integrate import integrate

    preprocess = importlib.import_module("spamask_integrate.preprocess").preprocess
    train = importlib.import_module("spamask_integrate.train").train

    adata, label, k_domains, harmony = load(args.data)
    preprocess(adata, batch_key="slice")
    graph = build_graph(adata, "slice")

    def model_input(variant: str) -> tuple[np.ndarray, bool]:
        """(the embedding of a peer, or SpaMask's input; whether SpaMask trains on it)"""
        name, _, hops = variant.rpartition("_")
        if variant in ("default", "pca"):
            return adata.obsm["X_pca"], variant == "default"
        if variant == "smoothed_pca" or (name in ("concat", "smoothed") and hops.isdigit()):
            smoothed_pca(adata, "slice", hops=2 if variant == "smoothed_pca" else int(hops))
            if name == "concat":
                return np.hstack([adata.obsm["X_pca"], adata.obsm["X_pca_smoothed"]]), True
            return adata.obsm["X_pca_smoothed"], variant != "smoothed_pca"
        p.error(f"unknown variant {variant!r}")

    out = RESULTS / f"input_smoothing_{args.data}.json"
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for variant in args.variants.split(","):
        x, trains = model_input(variant)
        for seed in seed_list(args.seeds):
            tic = time.perf_counter()
            if trains:
                adata.obsm["X_in"] = np.asarray(x, dtype=np.float32)
                train(adata, graph, "slice", seed=seed, quiet=True, use_rep="X_in")
                adata.obsm["E"] = adata.obsm["X_spamask"]
            else:
                adata.obsm["E"] = np.asarray(x, dtype=np.float32)
            rep = "E"
            if harmony:
                integrate(adata, "slice", use_rep=rep, key_added="E_harmony", seed=seed)
                rep = "E_harmony"
            cluster(adata, k_domains, "gmm", use_rep=rep, batch_key="slice", seed=seed)
            per_slice = [adjusted_rand_score(adata.obs[label][m], adata.obs["domain"][m])
                         for m in (adata.obs["slice"] == s for s in adata.obs["slice"].cat.categories)]
            rows.append({"variant": variant, "seed": seed, "ari": float(np.mean(per_slice)),
                         "per_slice": [float(a) for a in per_slice],
                         "seconds": time.perf_counter() - tic})
            print(variant, seed, round(rows[-1]["ari"], 4), flush=True)
            out.write_text(json.dumps({"machine": machine(), "data": args.data,
                                       "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
