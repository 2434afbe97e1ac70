"""Does data-parallel training cost accuracy? Per-slice ARI on the four DLPFC slices (K = 7)
after minibatch training in 1 process and in N torch.distributed processes (gloo on CPU).

Same data, graph, configuration and seeds on both sides; only the process count differs. Each
(nproc, seed) result is stored as soon as it is measured, so an interrupted run resumes.

Usage: python benchmarks/ddp_accuracy.py [--seeds 0 1 2] [--nproc 1 2] [--epochs 300]
Results: benchmarks/results/ddp_accuracy.json (printed as a table at the end)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _common import RESULTS, dlpfc_files, machine

OUT = RESULTS / "ddp_accuracy.json"


def per_slice_ari(adata, key: str) -> list[float]:
    from sklearn.metrics import adjusted_rand_score

    out = []
    for s in adata.obs["slice"].cat.categories:
        m = (adata.obs["slice"] == s).values & adata.obs["layer"].notna().values
        out.append(float(adjusted_rand_score(adata.obs["layer"][m], adata.obs[key][m])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=300)
    args = parser.parse_args()
    import spamask_integrate as si
    from spamask_integrate.distributed import train_distributed

    done = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    seen = {(r["nproc"], r["seed"]) for r in done["rows"]}
    adata = si.read_slices(dlpfc_files(), label_key="layer")
    si.preprocess(adata)
    graph = si.build_graph(adata)
    for seed in args.seeds:
        for nproc in args.nproc:
            if (nproc, seed) in seen:
                continue
            config = si.SpamaskConfig(epochs=args.epochs, minibatch=True, seed=seed,
                                      device="cpu", quiet=True)
            tic = time.perf_counter()
            if nproc == 1:
                si.train(adata, graph, config=config)
            else:
                train_distributed(adata, "slice", config, nproc=nproc).embed(adata, graph)
            wall = time.perf_counter() - tic
            row = {"nproc": nproc, "seed": seed, "train_seconds": round(wall, 1)}
            si.cluster(adata, 7, use_rep="X_spamask", key_added="domain_raw", seed=seed)
            row["ari"] = per_slice_ari(adata, "domain_raw")
            si.integrate(adata, seed=seed)
            si.cluster(adata, 7, key_added="domain_harmony", seed=seed)
            row["ari_harmony"] = per_slice_ari(adata, "domain_harmony")
            print(f"nproc={nproc} seed={seed}: ARI {np.mean(row['ari']):.3f}, "
                  f"+Harmony {np.mean(row['ari_harmony']):.3f}, {wall:.0f} s", flush=True)
            done["rows"].append(row)
            done["machine"] = machine()
            done["setting"] = {"epochs": args.epochs, "minibatch": True, "K": 7,
                               "graph": "kNN k=12 (default)", "input": "PCA-200 (default)"}
            RESULTS.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(done, indent=2))
    print("\n| processes | seeds | mean per-slice ARI | + Harmony | train s (median) |")
    print("|---|---|---|---|---|")
    for nproc in sorted({r["nproc"] for r in done["rows"]}):
        rows = [r for r in done["rows"] if r["nproc"] == nproc]
        a = [np.mean(r["ari"]) for r in rows]
        h = [np.mean(r["ari_harmony"]) for r in rows]
        t = np.median([r["train_seconds"] for r in rows])
        print(f"| {nproc} | {len(rows)} | {np.mean(a):.3f} ± {np.std(a):.3f} | "
              f"{np.mean(h):.3f} ± {np.std(h):.3f} | {t:.0f} |")


if __name__ == "__main__":
    main()
