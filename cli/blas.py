"""Which kernels numpy's OpenBLAS runs, chosen before numpy loads it.

numpy < 2 bundles OpenBLAS 0.3.23, which picks its kernels from the CPU's model number. On a
processor newer than its table (Intel Xeon model 207, Emerald Rapids, seen on the
development machine) it falls back to its oldest x86-64 kernels ("Prescott", SSE3 only),
although the CPU has AVX-512. Every numpy product in a run then goes 2-4x slower: the
PCA's eigendecomposition, Harmony, the Gaussian mixtures of the domain caller.

OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads. The command line sets it
from the instruction sets the CPU reports, before anything imports numpy:
``SkylakeX`` (AVX-512 F/CD/BW/DQ/VL) or ``Haswell`` (AVX2 and FMA), the kernel families
OpenBLAS itself uses for such CPUs. A value the user set is kept, whatever it is (to run
numpy as before, set the family OpenBLAS detected, e.g. ``OPENBLAS_CORETYPE=Prescott``).
Nothing is set off Linux/x86-64 or when numpy is already loaded (then it would only leak
into child processes without changing this one).

This module imports nothing beyond the standard library, so the command line can call it
first.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable, MutableMapping

#: The OpenBLAS kernel family for a CPU, by the instruction sets each needs, best first.
KERNELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("SkylakeX", frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})),
    ("Haswell", frozenset({"avx2", "fma"})),
)


def coretype_for(flags: Iterable[str]) -> str | None:
    """The best OpenBLAS kernel family whose instruction sets are all in ``flags`` (the flag
    names of /proc/cpuinfo), or ``None`` when none fits (OpenBLAS then detects alone)."""
    have = set(flags)
    for name, needs in KERNELS:
        if needs <= have:
            return name
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags of the first CPU in ``path``; empty when it cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def choose_openblas_kernels(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Set ``OPENBLAS_CORETYPE`` in ``environ`` (default ``os.environ``) for this CPU unless
    the user set it, numpy is already loaded, or this is not Linux on x86-64. Returns the
    value it set, or ``None`` when it set nothing."""
    environ = os.environ if environ is None else environ
    if "OPENBLAS_CORETYPE" in environ or "numpy" in sys.modules:
        return None
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    core = coretype_for(cpu_flags())
    if core is not None:
        environ["OPENBLAS_CORETYPE"] = core
    return core

