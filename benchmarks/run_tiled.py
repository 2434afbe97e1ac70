"""The whole default run, from the command line, on tiled DLPFC data of N spots.

``spamask-integrate run tiled_<N>.h5ad --slice-column slice --label-key layer --n-domains 7``
with nothing else set (scib on, report on), each repeat a fresh process under
``/usr/bin/time -v`` (peak RSS of the whole run). The data come from ``tiled.py`` (the four
DLPFC slices' shared genes, subset to their 2,000 seurat_v3 genes, tiled to N spots with
``datasets.tile_slices``); the one file holds every replica, told apart by obs["slice"].
Seconds per stage come from OUT/run.json; "write" is the wall time left after the pipeline
(writing h5ad, figures and report, plus the start-up imports). ARI/NMI: the mean over
slices of the per-slice scores and the pooled score over all spots. With several repeats the
domains of every repeat are compared with the first (ARI between runs of the same seed).

jax's compilation cache (``--cache-dir``, on by default) starts empty for each invocation of
this script (a fresh directory), so the first repeat compiles scib's kernels ("cold") and the
later ones load them ("warm", as a user's second run on the same data); each run records which.

``--dlpfc`` runs the four shared DLPFC slices themselves instead (four files, all genes):
``spamask-integrate run 151673.h5ad ... 151676.h5ad --label-key layer --n-domains 7``.

Usage: python benchmarks/run_tiled.py --spots 1000000 [--repeats 2] [--add] [--name NAME]
           [--cli "--context-weight 0"]
       python benchmarks/run_tiled.py --dlpfc [--repeats 2]
Result: benchmarks/results/run_tiled_<N>.json, run_dlpfc.json (or NAME.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import pandas as pd
from sklearn.metrics import adjusted_rand_score

from _common import RESULTS, dlpfc_files, timed_cli, write_result
from tiled import CACHE, tiled


def one_run(n: int | None, out: Path, extra: list[str], cache: Path) -> dict:
    inputs = [str(f) for f in dlpfc_files()] if n is None else \
        [str(CACHE / f"tiled_{n}.h5ad"), "--slice-column", "slice"]
    cmd = ["spamask-integrate", "-q", "run", *inputs,
           "--label-key", "layer", "--n-domains", "7", "-o", str(out), "--overwrite", *extra]
    warm = cache.is_dir() and any(cache.rglob("*"))
    _, wall, rss_gb = timed_cli(cmd, env={"SPAMASK_CACHE_DIR": str(cache)})
    info = json.loads((out / "run.json").read_text())
    seconds = {k: v for k, v in info["seconds"].items() if k != "total"}
    seconds["write_and_startup"] = wall - info["seconds"]["total"]
    m = pd.read_csv(out / "metrics.csv")
    dom = m[(m.kind == "domain") & (m.scope != "all")]
    pooled = m[(m.kind == "domain") & (m.scope == "all")].set_index("metric").value
    scib_n = m[(m.kind == "info") & (m.metric == "scib_n_spots")].value
    return {"n_spots": info["n_spots"], "n_slices": info["n_slices"], "seconds": seconds,
            "total_seconds": wall, "peak_rss_gb": rss_gb,
            "ari_mean_slice": float(dom[dom.metric == "ARI"].value.mean()),
            "nmi_mean_slice": float(dom[dom.metric == "NMI"].value.mean()),
            "ari_pooled": float(pooled["ARI"]), "nmi_pooled": float(pooled["NMI"]),
            "scib_n_spots": int(scib_n.iloc[0]) if len(scib_n) else None,
            "jax_cache": "warm" if warm else "cold"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", type=int, default=None)
    parser.add_argument("--dlpfc", action="store_true", help="the four DLPFC slices themselves")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--add", action="store_true", help="keep the runs already measured")
    parser.add_argument("--out", default="/tmp/run_tiled")
    parser.add_argument("--cli", default="",
                        help="extra options for `run`, one string (e.g. '--context-weight 0')")
    parser.add_argument("--name", default=None,
                        help="result file name (default run_tiled_<N> or run_dlpfc)")
    args = parser.parse_args()
    if args.dlpfc == (args.spots is not None):
        parser.error("give --spots N or --dlpfc")
    if args.spots is not None:
        tiled(args.spots)  # build and cache the data outside the timed runs
    name = args.name or ("run_dlpfc" if args.dlpfc else f"run_tiled_{args.spots}")
    old = json.loads((RESULTS / f"{name}.json").read_text()) if args.add and \
        (RESULTS / f"{name}.json").exists() else {"runs": []}
    runs = old["runs"]
    first_domains = None
    cache = Path(tempfile.mkdtemp(prefix="spamask_cache_"))
    for i in range(args.repeats):
        out = Path(f"{args.out}_{args.spots or 'dlpfc'}_{len(runs)}")
        runs.append(one_run(args.spots, out, args.cli.split(), cache))
        dom = pd.read_csv(out / "domains.csv", index_col=0)["domain"].astype(str)
        if first_domains is None:
            first_domains = dom
        else:
            runs[-1]["ari_vs_first_repeat"] = float(adjusted_rand_score(
                first_domains.loc[dom.index], dom))
        print({k: v for k, v in runs[-1].items() if k != "seconds"}, flush=True)
    stages = list(runs[0]["seconds"])
    seconds = {s: statistics.median(r["seconds"][s] for r in runs) for s in stages}
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    write_result(name, {
        "n_spots": runs[0]["n_spots"], "n_slices": runs[0]["n_slices"], "repeats": len(runs),
        "settings": "defaults (CLI run with " + ("the four files" if args.dlpfc else
                                                 "--slice-column") +
                    ", --label-key, --n-domains 7" + (f", {args.cli}" if args.cli else " only")
                    + ")",
        "seconds": seconds, "total_seconds": med("total_seconds"),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "ari_mean_slice": med("ari_mean_slice"), "nmi_mean_slice": med("nmi_mean_slice"),
        "ari_pooled": med("ari_pooled"), "nmi_pooled": med("nmi_pooled"), "runs": runs})


if __name__ == "__main__":
    main()
