"""Same seed, same answer? The default run on the four DLPFC slices, three times:

A. alone, 2 torch threads;
B. the same, while another process keeps a core busy (numpy matrix products);
C. alone, 1 torch thread (float sums in another order: bit-equality is not promised, the
   domains should still agree).

Each run is a fresh process. Writes ``results/repeatability.json``: whether A and B are equal
bit for bit (embedding) and spot for spot (domains), the ARI between the domains of A and C,
and each run's mean per-slice ARI against the layers.
Usage: python benchmarks/repeatability.py [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import dlpfc_files, write_result

RUN = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
import numpy as np, spamask_integrate as si
files = sys.argv[4:]
a = si.run(files, None, label_key="layer", n_domains=7, scib=False, seed=int(sys.argv[3]),
           quiet=True)
np.save(sys.argv[1] + "_emb.npy", a.obsm["X_spamask"])
np.save(sys.argv[1] + "_dom.npy", a.obs["domain"].astype(str).to_numpy())
np.save(sys.argv[1] + "_truth.npy", a.obs["layer"].astype(str).to_numpy())
np.save(sys.argv[1] + "_slice.npy", a.obs["slice"].astype(str).to_numpy())
"""

BUSY = """
import numpy as np
a = np.random.default_rng(0).random((800, 800))
while True:
    a = a @ a
    a /= np.abs(a).max()
"""


def _run(tmp: Path, name: str, threads: int, seed: int) -> dict:
    script = tmp / "run.py"
    script.write_text(RUN)
    tic = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(tmp / name), str(threads), str(seed),
                    *map(str, dlpfc_files())], check=True)
    out = {k: np.load(tmp / f"{name}_{k}.npy", allow_pickle=True)
           for k in ("emb", "dom", "truth", "slice")}
    out["seconds"] = time.perf_counter() - tic
    return out


def _mean_slice_ari(run: dict) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(np.mean([adjusted_rand_score(run["truth"][run["slice"] == s],
                                              run["dom"][run["slice"] == s])
                          for s in np.unique(run["slice"])]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.metrics import adjusted_rand_score

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        a = _run(tmp, "a", 2, args.seed)
        busy = subprocess.Popen([sys.executable, "-c", BUSY],
                                env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                     "PATH": "/usr/bin:/bin"})
        try:
            b = _run(tmp, "b", 2, args.seed)
            busy_alive = busy.poll() is None
        finally:
            busy.kill()
            busy.wait()
        c = _run(tmp, "c", 1, args.seed)
    result = {
        "seed": args.seed, "busy_process_alive_during_B": busy_alive,
        "A_vs_B_embedding_bit_equal": bool(np.array_equal(a["emb"], b["emb"])),
        "A_vs_B_domains_equal": bool(np.array_equal(a["dom"], b["dom"])),
        "A_vs_B_domain_ari": adjusted_rand_score(a["dom"], b["dom"]),
        "A_vs_C_embedding_max_abs_diff": float(np.abs(a["emb"] - c["emb"]).max()),
        "A_vs_C_domain_ari": adjusted_rand_score(a["dom"], c["dom"]),
        "mean_slice_ari": {k: _mean_slice_ari(r) for k, r in (("A", a), ("B", b), ("C", c))},
        "seconds": {k: r["seconds"] for k, r in (("A", a), ("B", b), ("C", c))},
    }
    print(json.dumps(result, indent=1))
    write_result(f"repeatability_seed{args.seed}", result)


if __name__ == "__main__":
    main()
