"""Do slice-sharded runs find the same domains? The four DLPFC slices, default settings.

For each seed: ``spamask-integrate run 151673.h5ad ... 151676.h5ad --label-key layer
--n-domains 7 --no-scib --no-report --seed S`` in one process, and the same with
``--nproc 2 --shard-slices`` (two ranks of two slices each, one thread each), one run at a
time. Reports the per-slice ARI of both, the ARI between their domains, and the seconds per
stage.

Usage: python benchmarks/shard_accuracy.py --seeds 0,1,2,3,4
Result: benchmarks/results/shard_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import adjusted_rand_score

from _common import RESULTS, dlpfc_files, write_result


def one_run(seed: int, sharded: bool, out: Path) -> dict:
    cmd = ["spamask-integrate", "-q", "run", *map(str, dlpfc_files()), "--label-key", "layer",
           "--n-domains", "7", "--no-scib", "--no-report", "--seed", str(seed), "-o", str(out),
           "--overwrite"] + (["--nproc", "2", "--shard-slices"] if sharded else [])
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = pd.read_csv(out / "metrics.csv")
    ari = m[(m.kind == "domain") & (m.scope != "all") & (m.metric == "ARI")]
    return {"seconds": json.loads((out / "run.json").read_text())["seconds"],
            "wall_seconds": time.perf_counter() - tic,
            "ari": {str(r.scope): float(r.value) for r in ari.itertuples()},
            "ari_mean_slice": float(ari.value.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    done = RESULTS / "shard_accuracy.json"  # seeds already measured are kept, not rerun
    rows = json.loads(done.read_text())["runs"] if done.exists() else []
    for seed in (int(s) for s in args.seeds.split(",")):
        if any(r["seed"] == seed for r in rows):
            continue
        row = {"seed": seed}
        for mode in ("single", "sharded"):
            out = Path(f"/tmp/shard_accuracy_{mode}_{seed}")
            row[mode] = one_run(seed, mode == "sharded", out)
        domains = [pd.read_csv(f"/tmp/shard_accuracy_{m}_{seed}/domains.csv", index_col="spot")
                   for m in ("single", "sharded")]
        row["ari_between"] = float(adjusted_rand_score(
            domains[0].domain, domains[1].domain.loc[domains[0].index]))
        print(f"seed {seed}: single {row['single']['ari_mean_slice']:.3f}, sharded "
              f"{row['sharded']['ari_mean_slice']:.3f}, between {row['ari_between']:.3f}",
              flush=True)
        rows.append(row)
        rows.sort(key=lambda r: r["seed"])
        summary = {mode: {"mean": statistics.mean(r[mode]["ari_mean_slice"] for r in rows),
                          "sd": statistics.stdev(r[mode]["ari_mean_slice"] for r in rows)
                          if len(rows) > 1 else 0.0} for mode in ("single", "sharded")}
        write_result("shard_accuracy", {"config": {"seeds": [r["seed"] for r in rows],
                                                   "defaults": True,
                                                   "scib": False},
                                        "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
