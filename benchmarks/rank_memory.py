"""Where one rank of a slice-sharded run holds its memory: an RSS timeline of its read,
preprocess and graph steps.

One process does what rank ``--rank`` of ``--world`` ranks does with its share of the tiled
atlas (``plan_shards`` + ``read_shard`` + ``preprocess`` + ``build_graph``); the collectives
are those of one process, so the genes and the PCA come from this rank's slices alone, which
changes no array size. A thread samples the resident set (``/proc/self/statm``) every 10 ms,
and the helpers of ``io`` and ``preprocess`` are wrapped to mark when each starts and ends:
each row gives the RSS at a mark and the largest RSS sampled since the previous mark. Run
alone, with one thread (``OMP_NUM_THREADS=1``) as a rank of 2+ on 2 cores has.

Usage: OMP_NUM_THREADS=1 python benchmarks/rank_memory.py --spots 1000000 --world 4
Result: benchmarks/results/rank_memory_<N>_of<world>.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import threading
import time

from _common import write_result
from tiled import CACHE, tiled

WRAPPED = {
    "spamask_integrate.io": ["_read_h5ad_rows", "_split_by_column", "_join_slices"],
    "spamask_integrate.preprocess": ["_gene_filter", "_column_moments", "_group_moments",
                                     "_select_hvgs", "_normalise", "_scaled_pca", "_gram_pca"],
}


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=1_000_000)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--rank", type=int, default=0)
    args = parser.parse_args()
    path = CACHE / f"tiled_{args.spots}.h5ad"
    if not path.is_file():
        tiled(args.spots)

    samples: list[tuple[float, float]] = []
    marks: list[tuple[float, str, float]] = []
    running = [True]

    def sample() -> None:
        while running[0]:
            samples.append((time.perf_counter(), rss_gb()))
            time.sleep(0.01)

    def mark(name: str) -> None:
        marks.append((time.perf_counter(), name, rss_gb()))

    t0 = time.perf_counter()
    threading.Thread(target=sample, daemon=True).start()
    for module, names in WRAPPED.items():  # (the helpers are looked up as module globals)
        mod = importlib.import_module(module)
        for name in names:
            def wrap(f, name=name):
                @functools.wraps(f)
                def inner(*a, **k):
                    mark(f"{name} start")
                    out = f(*a, **k)
                    mark(f"{name} end")
                    return out
                return inner
            setattr(mod, name, wrap(getattr(mod, name)))

    from spamask_integrate.graph import build_graph
    from spamask_integrate.preprocess import preprocess
    from spamask_integrate.shard import Collective, plan_shards, read_shard
    from spamask_integrate.utils import release_freed_memory

    mark("imports end")
    plan = plan_shards([path], args.world, slice_column="slice")
    adata = read_shard(plan, args.rank, Collective(), batch_key="batch", label_key="layer")
    release_freed_memory()  # as the run does after each step
    mark("read end")
    preprocess(adata, batch_key="batch", comm=Collective())
    release_freed_memory()
    mark("preprocess end")
    build_graph(adata, "batch")
    mark("graph end")
    running[0] = False
    time.sleep(0.05)

    rows, prev = [], t0
    for t, name, rss in marks:
        seen = [r for s, r in samples if prev <= s <= t]
        rows.append({"mark": name, "seconds": round(t - t0, 1), "rss_gb": round(rss, 2),
                     "peak_since_last_mark_gb": round(max(seen, default=rss), 2)})
        prev = t
    for row in rows:
        print(row)
    peak = max(r for _, r in samples)
    print(f"rank {args.rank} of {args.world}: {adata.n_obs} spots, peak {peak:.2f} GB")
    write_result(f"rank_memory_{args.spots}_of{args.world}", {
        "spots": args.spots, "world": args.world, "rank": args.rank,
        "rank_spots": int(adata.n_obs), "peak_rss_gb": round(peak, 2), "timeline": rows})


if __name__ == "__main__":
    main()
