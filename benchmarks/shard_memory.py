"""Peak memory per rank of a slice-sharded run against the number of ranks.

``spamask-integrate run tiled_<N>.h5ad --slice-column slice --shard-slices --nproc R
--label-key layer --n-domains 7 --no-scib --no-report`` for R = 1, 2, 4, each a fresh process
under ``/usr/bin/time -v``. Every rank records the seconds of its read, preprocess, graph,
train and embed stages and its peak RSS at the end of each (``uns["spamask"]["shard"]``); the
launching process (plan, gathered n x 30 results, Harmony, domains, writing) is measured by
``time -v``. ``--epochs E`` sets the training budget (default: the run's own, "auto").

Usage: python benchmarks/shard_memory.py --spots 1000000 --ranks 1,2,4 [--epochs 1]
Result: benchmarks/results/shard_memory_<N>.json (the default budget) or
shard_memory_<N>_epochs<E>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import pandas as pd

from _common import timed_cli, write_result
from tiled import CACHE, tiled


def one_run(path: Path, ranks: int, out: Path, epochs: str | None) -> dict:
    cmd = ["spamask-integrate", "-q", "run", str(path), "--slice-column",
           "slice", "--label-key", "layer", "--n-domains", "7", "--no-scib", "--no-report",
           "--shard-slices", "--nproc", str(ranks), "-o", str(out), "--overwrite"]
    if epochs:
        cmd += ["--epochs", epochs]
    _, wall, rss_gb = timed_cli(cmd)
    result = ad.read_h5ad(out / "integrated.h5ad", backed="r")
    shard = result.uns["spamask"]["shard"]
    run_seconds = dict(result.uns["spamask"]["run"]["seconds"])
    m = pd.read_csv(out / "metrics.csv")
    dom = m[(m.kind == "domain") & (m.scope != "all")]
    row = {"ranks": ranks, "wall_seconds": wall,
           "largest_process_rss_gb": rss_gb,  # time -v: the largest process of the tree
           "stages": {r: {s: dict(v) for s, v in st.items()} for r, st in shard["stages"].items()},
           "spots_per_rank": {r: int(v) for r, v in shard["spots"].items()},
           "run_seconds": {k: float(v) for k, v in run_seconds.items()},
           "ari_mean_slice": float(dom[dom.metric == "ARI"].value.mean())}
    result.file.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--epochs", default=None, help="training budget [the run's default]")
    args = parser.parse_args()
    path = CACHE / f"tiled_{args.spots}.h5ad"
    if not path.is_file():
        tiled(args.spots)  # builds and caches the file
    rows = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        row = one_run(path, ranks, Path(f"/tmp/shard_memory_{args.spots}_{ranks}"), args.epochs)
        peaks = {r: max(v["peak_rss_gb"] for v in st.values()) for r, st in row["stages"].items()}
        print(f"{ranks} rank(s): wall {row['wall_seconds']:.0f} s, peak RSS per rank "
              f"{', '.join(f'{p:.2f}' for p in peaks.values())} GB, ARI {row['ari_mean_slice']:.3f}",
              flush=True)
        rows.append(row)
        name = f"shard_memory_{args.spots}" + (f"_epochs{args.epochs}" if args.epochs else "")
        write_result(name, {
            "config": {"spots": args.spots, "epochs": args.epochs or "auto", "scib": False,
                       "data": str(path)},
            "runs": rows})


if __name__ == "__main__":
    main()
