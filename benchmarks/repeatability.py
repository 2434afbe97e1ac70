"""Same seed, same answer? The default run on the four DLPFC slices, three times:

A. alone, 2 torch threads;
B. the same, while another process keeps a core busy (numpy matrix products);
C. alone, 1 torch thread (float sums in another order: bit-equality is not promised, the
   domains should still agree).

Each run is a fresh ``spamask-integrate run ... --no-scib`` process (the thread count set by
``OMP_NUM_THREADS``). Writes ``results/repeatability_seed<S>.json``: whether A and B are equal
bit for bit (embedding) and spot for spot (domains), the ARI between the domains of A and C,
and each run's mean per-slice ARI against the layers.
Usage: python benchmarks/repeatability.py [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import dlpfc_files, write_result

BUSY = """
import numpy as np
a = np.random.default_rng(0).random((800, 800))
while True:
    a = a @ a
    a /= np.abs(a).max()
"""


def _run(tmp: Path, name: str, threads: int, seed: int) -> dict:
    import anndata as ad

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    tic = time.perf_counter()
    done = subprocess.run(["spamask-integrate", "run", *map(str, dlpfc_files()), "-o",
                           str(tmp / name), "--label-key", "layer", "--n-domains", "7",
                           "--seed", str(seed), "--no-scib"],
                          check=True, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - tic
    adata = ad.read_h5ad(tmp / name / "integrated.h5ad")
    run = json.loads((tmp / name / "run.json").read_text())
    return {"emb": adata.obsm["X_spamask"], "dom": adata.obs["domain"].astype(str).to_numpy(),
            "truth": adata.obs["layer"].astype(str).to_numpy(),
            "slice": adata.obs["slice"].astype(str).to_numpy(), "seconds": seconds,
            "threads": threads, "stdout": done.stdout, "run_seconds": run.get("seconds")}


def _mean_slice_ari(run: dict) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(np.mean([adjusted_rand_score(run["truth"][run["slice"] == s],
                                              run["dom"][run["slice"] == s])
                          for s in np.unique(run["slice"])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-one-thread", action="store_true", help="leave out run C")
    parser.add_argument("--keep-report", type=Path, default=None,
                        help="copy run A's report.html here (it is a temporary folder)")
    args = parser.parse_args()
    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = _run(tmp, "a", 2, args.seed)
        if args.keep_report is not None:
            shutil.copyfile(tmp / "a" / "report.html", args.keep_report)
        busy = subprocess.Popen([sys.executable, "-c", BUSY],
                                env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                     "PATH": "/usr/bin:/bin"})
        try:
            b = _run(tmp, "b", 2, args.seed)
            busy_alive = busy.poll() is None
        finally:
            busy.kill()
            busy.wait()
        c = None if args.skip_one_thread else _run(tmp, "c", 1, args.seed)
    runs = {"A": a, "B": b, **({"C": c} if c is not None else {})}
    result = {
        "seed": args.seed, "busy_process_alive_during_B": busy_alive,
        "A_vs_B_embedding_bit_equal": bool(np.array_equal(a["emb"], b["emb"])),
        "A_vs_B_domains_equal": bool(np.array_equal(a["dom"], b["dom"])),
        "A_vs_B_domain_ari": adjusted_rand_score(a["dom"], b["dom"]),
        **({"A_vs_C_embedding_max_abs_diff": float(np.abs(a["emb"] - c["emb"]).max()),
            "A_vs_C_domain_ari": adjusted_rand_score(a["dom"], c["dom"])} if c is not None
           else {}),
        "mean_slice_ari": {k: _mean_slice_ari(r) for k, r in runs.items()},
        "seconds": {k: r["seconds"] for k, r in runs.items()},
        "stage_seconds_A": a["run_seconds"],
        "stdout_A": a["stdout"],
    }
    print(json.dumps(result, indent=1))
    write_result(f"repeatability_seed{args.seed}", result)


if __name__ == "__main__":
    main()
