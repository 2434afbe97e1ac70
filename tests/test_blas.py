"""The command line picks numpy's OpenBLAS kernels from the CPU's flags (cli/blas.py)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
from cli.blas import choose_openblas_kernels, coretype_for, cpu_flags
from spamask_integrate.utils import numpy_blas

AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_coretype_for_takes_the_best_family_the_flags_allow():
    assert coretype_for(AVX512 | {"avx2", "fma", "sse3"}) == "SkylakeX"
    assert coretype_for({"avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 incomplete
    assert coretype_for({"avx", "sse4_2"}) is None  # OpenBLAS is left to detect alone
    assert coretype_for({"avx2"}) is None  # AVX2 without FMA


def test_cpu_flags_reads_the_first_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel\t\t: 207\nflags\t\t: fpu sse3 avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "sse3", "avx2", "fma"}
    assert cpu_flags(str(tmp_path / "absent")) == set()


def test_a_users_value_is_kept_and_a_loaded_numpy_is_not_touched():
    env = {"OPENBLAS_CORETYPE": "Prescott"}
    assert choose_openblas_kernels(env) is None and env == {"OPENBLAS_CORETYPE": "Prescott"}
    env = {"OPENBLAS_CORETYPE": ""}  # whatever the user set, even nothing
    assert choose_openblas_kernels(env) is None and env == {"OPENBLAS_CORETYPE": ""}
    assert "numpy" in sys.modules  # pytest's process: too late to choose, so nothing is set
    env = {}
    assert choose_openblas_kernels(env) is None and env == {}


@pytest.mark.skipif(shutil.which("spamask-integrate") is None,
                    reason="console script not installed (pip install -e .)")
@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64"
                    or coretype_for(cpu_flags()) is None or not numpy_blas().startswith("openblas"),
                    reason="needs Linux on x86-64 with AVX2 and numpy on OpenBLAS")
def test_the_command_line_runs_numpy_on_the_kernels_it_chose(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    args = ["spamask-integrate", "-vv", "--no-cache", "report", str(tmp_path / "absent")]
    res = subprocess.run(args, env=env, capture_output=True, text=True)
    chosen = coretype_for(cpu_flags())
    assert "numpy's BLAS: openblas " in res.stderr, res.stderr
    line = next(x for x in res.stderr.splitlines() if x.startswith("numpy's BLAS"))
    # OpenBLAS reports the family it loaded: the one chosen from the flags
    assert line.split(" (")[0].endswith(chosen) and "set from the CPU's flags" in line, line
    res = subprocess.run(args, env={**env, "OPENBLAS_CORETYPE": "Prescott"},
                         capture_output=True, text=True)
    line = next(x for x in res.stderr.splitlines() if x.startswith("numpy's BLAS"))
    assert line.split(" (")[0].endswith("Prescott") and "set from" not in line, line
