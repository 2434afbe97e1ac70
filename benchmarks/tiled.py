"""The tiled DLPFC benchmark data: the four shared slices copied and perturbed to N spots.

``tiled(n)`` reads the four DLPFC slices, keeps the genes they share, subsets them to the 2,000
seurat_v3 genes of the four originals (at 10^6 spots the counts of all 10,487 genes would
hold about 2 x 10^9 non-zeros, 16 GB; 2,000 genes hold about 3 x 10^8) and calls
``spamask_integrate.datasets.tile_slices`` with its defaults (seed 0). Each replica is its
own slice; ``obs["layer"]`` is the truth. ``prepped(n)`` adds the default preprocessing and
graph (``preprocess``, ``build_graph``) and keeps obs, obsm and obsp only.
Both are cached in ``$SPAMASK_TILED_CACHE`` (default /tmp/spamask_tiled).

Usage: python benchmarks/tiled.py 1000000   (builds and caches; prints seconds and size)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from _common import dlpfc_files

CACHE = Path(os.environ.get("SPAMASK_TILED_CACHE", "/tmp/spamask_tiled"))
N_GENES = 2000


def tiled(n_spots: int):
    import anndata as ad

    path = CACHE / f"tiled_{n_spots}.h5ad"
    if path.is_file():
        return ad.read_h5ad(path)
    import scanpy as sc

    import spamask_integrate as si

    src = si.read_slices([str(f) for f in dlpfc_files()])
    hvg = sc.pp.highly_variable_genes(src, n_top_genes=N_GENES, flavor="seurat_v3",
                                      batch_key="slice", inplace=False,
                                      layer="counts" if "counts" in src.layers else None)
    src = src[:, hvg["highly_variable"].to_numpy()].copy()
    out = si.datasets.tile_slices(src, n_spots, seed=0)
    del out.layers["counts"]  # the same matrix as X; stored twice it doubles file and reads
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.h5ad")
    out.write_h5ad(tmp)
    tmp.replace(path)
    return out


def prepped(n_spots: int):
    """``tiled(n)`` preprocessed and with its graph, all defaults; X and layers dropped."""
    import anndata as ad

    import spamask_integrate as si

    path = CACHE / f"prepped_{n_spots}.h5ad"
    if path.is_file():
        return ad.read_h5ad(path)
    a = tiled(n_spots)
    tic = time.perf_counter()
    si.preprocess(a)
    t_pre = time.perf_counter() - tic
    si.build_graph(a)
    slim = ad.AnnData(obs=a.obs, obsm=dict(a.obsm), obsp=dict(a.obsp), uns=dict(a.uns))
    slim.uns["bench_seconds"] = {"preprocess": t_pre,
                                 "graph": time.perf_counter() - tic - t_pre}
    tmp = path.with_suffix(".part.h5ad")
    slim.write_h5ad(tmp)
    tmp.replace(path)
    return slim


if __name__ == "__main__":
    tic = time.perf_counter()
    a = tiled(int(sys.argv[1]))
    if "--prep" in sys.argv:
        prepped(int(sys.argv[1]))
    n_slices = a.obs["slice"].nunique()
    print(f"{a.n_obs} spots, {n_slices} slices, {a.n_vars} genes, {a.X.nnz} non-zeros, "
          f"{time.perf_counter() - tic:.0f} s")
