"""The whole pipeline (``spamask_integrate.run``) on synthetic slices, with seconds per stage
and peak RSS: read is replaced by generating the data in memory.

Each repeat runs in a fresh process (so its peak RSS is its own); the result holds every
run and the per-stage medians.

Usage: python benchmarks/run_1m.py [--spots 1000000] [--epochs 1] [--repeats 1] [--no-scib]
                                   [--add]
Results: benchmarks/results/run_<spots>.json (run_<spots>_noscib.json with --no-scib);
--add keeps the runs already in that file and adds the new ones to the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, peak_rss_gb, write_result


def one_run(args: argparse.Namespace) -> dict:
    import spamask_integrate as si

    tic = time.perf_counter()
    adata = si.datasets.synthetic_slices(args.slices, args.spots // args.slices, 300, 7, seed=0)
    synthetic = time.perf_counter() - tic
    adata = si.run(adata, args.out, label_key="ground_truth", n_domains=7, k=12,
                   preprocess_kwargs={"n_top_genes": None, "n_comps": 200, "min_cells": 1},
                   epochs=args.epochs, scib=not args.no_scib, seed=0)
    total = time.perf_counter() - tic
    seconds = {"synthetic": synthetic, **dict(adata.uns["spamask"]["run"]["seconds"])}
    table = si.evaluate(adata, "ground_truth", scib=False)
    ari = table[(table.metric == "ARI") & (table.scope == "all")].value.iloc[0]
    return {"n_spots": adata.n_obs, "seconds": seconds, "total_seconds": total,
            "peak_rss_gb": peak_rss_gb(), "ari_all": float(ari)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-scib", action="store_true",
                        help="score ARI/NMI only (scib samples at most 20k spots, so its time "
                             "does not grow with the data; measure it once per size)")
    parser.add_argument("--add", action="store_true",
                        help="add to the runs already in the result file (same settings)")
    parser.add_argument("--out", default="/tmp/run_1m")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON file of one repeat
    args = parser.parse_args()
    if args.child:
        Path(args.child).write_text(json.dumps(one_run(args)))
        return

    name = f"run_{(args.spots // args.slices) * args.slices}" + ("_noscib" if args.no_scib else "")
    runs = []
    if args.add and (RESULTS / f"{name}.json").exists():
        old = json.loads((RESULTS / f"{name}.json").read_text())
        if old["epochs"] != args.epochs:
            sys.exit(f"{name}.json has {old['epochs']} epochs, not {args.epochs}")
        # a file written before repeats existed holds its one run at the top level
        runs = old.get("runs") or [{k: old[k] for k in ("n_spots", "seconds", "total_seconds",
                                                        "peak_rss_gb", "ari_all")}]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            child = Path(tmp) / f"run{i}.json"
            cmd = [sys.executable, __file__, "--spots", str(args.spots), "--slices",
                   str(args.slices), "--epochs", str(args.epochs), "--out", args.out,
                   "--child", str(child)] + (["--no-scib"] if args.no_scib else [])
            subprocess.run(cmd, check=True)
            runs.append(json.loads(child.read_text()))
            print(f"repeat {i + 1}/{args.repeats}: {runs[-1]['total_seconds']:.1f} s, "
                  f"{runs[-1]['peak_rss_gb']:.2f} GB", flush=True)
    stages = list(runs[0]["seconds"])
    seconds = {s: statistics.median(r["seconds"][s] for r in runs) for s in stages}
    total = statistics.median(r["total_seconds"] for r in runs)
    slowest = max(seconds, key=seconds.get)
    result = {"n_spots": runs[0]["n_spots"], "epochs": args.epochs, "scib": not args.no_scib,
              "repeats": len(runs), "seconds": seconds, "total_seconds": total,
              "slowest_stage": slowest, "slowest_share": seconds[slowest] / total,
              "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
              "ari_all": runs[0]["ari_all"], "runs": runs}
    print({k: v for k, v in result.items() if k != "runs"})
    write_result(name, result)


if __name__ == "__main__":
    main()
