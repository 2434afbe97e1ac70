"""numpy's OpenBLAS with the kernels it detects alone against those the command line sets.

Each variant runs in a fresh process (OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when numpy
loads it): without ``OPENBLAS_CORETYPE`` (OpenBLAS's own detection; an empty value is not
the same, it picked "Cooperlake" here) and with the value ``cli.blas.choose_openblas_kernels``
sets for this CPU. Timed, median of 5 after one warm-up:
a float32 product of the shape the PCA's Gram blocks had (1,398 x 3,000), the float64
eigendecomposition of a 3,000 x 3,000 symmetric matrix (the kind of call the PCA and Harmony
make), and 200 small products of the GMM's shapes (11,380 x 30).

Usage: python benchmarks/blas_kernels.py
Result: benchmarks/results/blas_kernels.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _common import write_result
from cli.blas import coretype_for, cpu_flags

# The probe reads numpy's BLAS record itself rather than through spamask_integrate.utils:
# importing the package would load torch (and its MKL and OpenMP) into the timed process.
PROBE = r"""
import json, statistics, time
import numpy as np
from threadpoolctl import threadpool_info

arch = next((i.get("architecture") for i in threadpool_info()
             if i.get("user_api") == "blas" and "numpy" in i.get("filepath", "")), None)
rng = np.random.default_rng(0)
z = rng.standard_normal((1398, 3000)).astype(np.float32)
a = rng.standard_normal((3000, 3000)); a = a @ a.T
x = rng.standard_normal((11380, 30)); c = x[:30].T.copy()

def small():
    for _ in range(200):
        x.T @ x
        x @ c

def timed(f):
    f()
    times = []
    for _ in range(5):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return statistics.median(times)

print(json.dumps({"architecture": arch,
                  "gram_block_f32_s": timed(lambda: z.T @ z),
                  "eigh_3000_f64_s": timed(lambda: np.linalg.eigh(a)),
                  "gmm_products_s": timed(small)}))
"""


def probe(coretype: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype is not None:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    chosen = coretype_for(cpu_flags())
    rows = {"detected by OpenBLAS": probe(None)}
    if chosen:
        rows[f"OPENBLAS_CORETYPE={chosen} (the command line's choice)"] = probe(chosen)
    for name, row in rows.items():
        print(name, row)
    model = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model\t")), None)
    write_result("blas_kernels", {"cpu_model_number": model, "chosen": chosen,
                                  "variants": rows})


if __name__ == "__main__":
    main()
