"""Integration quality of four embeddings of the same preprocessed data: PCA, PCA + Harmony,
SpaMask, SpaMask + Harmony (batch = slice / section).

``--dataset dlpfc``: the four DLPFC slices, scib-metrics with label = cortical layer.

``--dataset her2``: the 28 unlabelled HER2+ breast-cancer sections (8 patients, ST platform):

- scib-metrics with batch = section and label = patient. scib's BRAS (batch silhouette),
  kBET and graph connectivity are computed within each label, so here they measure how well
  the sections of one patient mix; its bio scores reward keeping patients apart (tumours of
  different patients differ); iLISI is over all spots.
- label-free spatial coherence of K domains found by the same GMM on each embedding:
  neighbour agreement (higher = more coherent), PAS and CHAOS (lower = more coherent).

Both: label-free spatial coherence of the domains, as above (K = 7 on DLPFC).

Usage: python benchmarks/integration.py --dataset her2|dlpfc [--k K] [--seed 0]
Results: benchmarks/results/integration_<dataset>.json and integration_<dataset>.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from _common import RESULTS, SHARED, dlpfc_files, machine

HER2 = SHARED / "her2st_serial_unlabelled"
EMBEDDINGS = {"PCA": "X_pca", "PCA + Harmony": "X_pca_harmony", "SpaMask": "X_spamask",
              "SpaMask + Harmony": "X_spamask_harmony"}
SCIB = ["Batch correction", "Bio conservation", "Total", "BRAS", "iLISI", "KBET",
        "Graph connectivity"]
SPATIAL = ["neighbour_agreement", "PAS", "CHAOS"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["her2", "dlpfc"], default="her2")
    parser.add_argument("--k", type=int, default=None,
                        help="domains per embedding (default: 8 on HER2+, 7 on DLPFC)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--sections", type=int, default=28,
                        help="use the first N sections only (a quick check; results not saved)")
    args = parser.parse_args()
    import spamask_integrate as si

    if args.dataset == "her2":
        files = sorted(HER2.glob("*.h5ad"))
        if len(files) != 28:
            sys.exit(f"the 28 HER2+ sections are not in {HER2}; set SPAMASK_SHARED")
        files, label, k = files[:args.sections], "patient", args.k or 8
    else:
        files, label, k = dlpfc_files(), "layer", args.k or 7
    full = args.dataset == "dlpfc" or args.sections == 28
    stages = {}
    tic = time.perf_counter()
    adata = si.read_slices(files, label_key=label if args.dataset == "dlpfc" else None)
    si.preprocess(adata)
    graph = si.build_graph(adata)
    stages["read + preprocess + graph"] = time.perf_counter() - tic
    tic = time.perf_counter()
    si.train(adata, graph, epochs=args.epochs, seed=args.seed, quiet=True)
    stages["train"] = time.perf_counter() - tic
    tic = time.perf_counter()
    si.integrate(adata, use_rep="X_pca", key_added="X_pca_harmony", seed=args.seed)
    si.integrate(adata, seed=args.seed)
    stages["harmony x2"] = time.perf_counter() - tic

    table: dict[str, dict[str, float]] = {name: {} for name in EMBEDDINGS}
    tic = time.perf_counter()
    for name, key in EMBEDDINGS.items():
        si.cluster(adata, k, use_rep=key, key_added=f"domain_{key}", seed=args.seed)
        rows = si.evaluate(adata, domain_key=f"domain_{key}", scib=False)
        overall = rows[(rows.kind == "spatial") & (rows.scope == "all")]
        table[name].update(dict(zip(overall.metric, overall.value)))
    stages["cluster + spatial scores"] = time.perf_counter() - tic
    tic = time.perf_counter()
    rows = si.evaluate(adata, label, embedding_keys=list(EMBEDDINGS.values()),
                       domain_key=f"domain_{EMBEDDINGS['SpaMask + Harmony']}", scib=True,
                       scib_max_spots=20_000, seed=args.seed)
    stages["scib"] = time.perf_counter() - tic
    integ = rows[rows.kind == "integration"]
    for name, key in EMBEDDINGS.items():
        mine = integ[integ.embedding == key]
        table[name].update(dict(zip(mine.metric, mine.value)))

    meta = {"dataset": args.dataset, "scib_label": label, "n_spots": int(adata.n_obs),
            "n_slices": int(adata.obs["slice"].nunique()),
            "n_labels": int(adata.obs[label].nunique()), "n_edges": int(graph.num_edges()),
            "k_domains": k, "seed": args.seed, "epochs": args.epochs,
            "stage_seconds": {k: round(v, 1) for k, v in stages.items()}}
    if full:
        (RESULTS / f"integration_{args.dataset}.json").write_text(
            json.dumps({"machine": machine(), **meta, "scores": table}, indent=2))
    cols = [c for c in SCIB if any(c in t for t in table.values())] + SPATIAL
    lines = [f"{args.dataset}: {meta['n_spots']:,} spots, {meta['n_slices']} slices, "
             f"scib label {label} ({meta['n_labels']} values); K = {k}; seed {args.seed}", "",
             "| embedding | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, scores in table.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{scores[c]:.3f}" if c in scores and np.isfinite(scores[c]) else "" for c in cols)
            + " |")
    text = "\n".join(lines) + "\n"
    if full:
        (RESULTS / f"integration_{args.dataset}.md").write_text(text)
    print(text)
    print("stage seconds:", meta["stage_seconds"])


if __name__ == "__main__":
    main()
