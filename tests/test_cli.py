import json
import os
import shutil
import subprocess
import sys

import anndata as ad
import pandas as pd
import pytest
from click.testing import CliRunner

from cli.main import main
from conftest import write_plan_with_a_broken_dataset, write_slices_and_config

FAST_CONFIG = """
train: {epochs: 10, hidden_dim: 32, latent_dim: 16, edge_decoder_hidden: 32}
preprocess: {n_top_genes: null, n_comps: 20, min_cells: 5}
scib_max_spots: 1000
"""
OUTPUTS = {"domains.csv", "metrics.csv", "metrics.json", "spatial_domains.png", "umap.png",
           "scores.png", "integrated.h5ad", "run.json", "report.html"}


@pytest.fixture
def slice_files(tiny_slices, tmp_path):
    return write_slices_and_config(tiny_slices, tmp_path, FAST_CONFIG)


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_run_then_evaluate_reproduces(slice_files, tmp_path):
    paths, config = slice_files
    out = tmp_path / "out"
    res = _run(["-q", "run", *map(str, paths), "-o", str(out), "--label-key", "ground_truth",
                "--n-domains", "4", "--k", "6", "--config", str(config), "--seed", "5",
                "--context-weight", "0.25", "--n-components", "6", "--keep-starts", "0.5"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == OUTPUTS
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "ok" and run_json["params"]["train"]["seed"] == 5
    assert run_json["params"]["context_weight"] == 0.25
    assert run_json["params"]["n_components"] == 6  # 6 components joined into 4 domains
    assert run_json["params"]["keep_starts"] == 0.5
    assert pd.read_csv(out / "domains.csv")["domain"].nunique() == 4
    assert {"read", "train", "cluster", "evaluate", "total"} <= set(run_json["seconds"])
    assert "ARI" in res.output
    res2 = _run(["-q", "evaluate", str(out / "integrated.h5ad"), "--label-key", "ground_truth",
                 "-o", str(tmp_path / "again.csv")])
    assert res2.exit_code == 0, res2.output
    first = pd.read_csv(out / "metrics.csv").fillna("")
    again = pd.read_csv(tmp_path / "again.csv").fillna("")
    merged = first.merge(again, on=["kind", "scope", "embedding", "metric"])
    assert len(merged) == len(first) == len(again)
    assert (merged["value_x"] - merged["value_y"]).abs().max() < 1e-6
    assert (merged["kind"] == "integration").any()


def test_benchmark_survives_failure_and_resumes(slice_files, tmp_path):
    paths, _ = slice_files
    plan = write_plan_with_a_broken_dataset(paths, tmp_path)
    out = tmp_path / "bench"
    res = _run(["-q", "benchmark", str(plan), "-o", str(out)])
    assert res.exit_code == 0, res.output
    results = pd.read_csv(out / "results.csv")
    failed = results[results.status == "failed"]
    assert set(failed.dataset) == {"broken"} and len(failed) == 4
    assert failed.error.str.contains("missing.h5ad").all()
    ok = results[results.status == "ok"]
    assert set(ok.method) == {"pca", "smoothed_pca"} and set(ok.seed) == {0, 1}
    summary = (out / "summary.md").read_text()
    assert "smoothed_pca" in summary and "Failed combinations" in summary
    assert (out / "summary.png").stat().st_size > 0
    stamp = ok.seconds.sum()
    res = _run(["benchmark", str(plan), "-o", str(out)])
    assert res.exit_code == 0
    assert "4 already finished" in res.output or "4 already finished" in (res.stderr or "")
    again = pd.read_csv(out / "results.csv")
    assert again[again.status == "ok"].seconds.sum() == pytest.approx(stamp)  # not redone


def _assert_fails(args, code, message, out=None):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == code, (res.exit_code, res.output)
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert message in text, text
    assert "Traceback" not in text
    if out is not None:
        assert not out.exists() or not any(out.iterdir())


def test_bad_inputs(slice_files, tmp_path):
    paths, config = slice_files
    out = tmp_path / "out"
    base = ["run", "-o", str(out), "--config", str(config)]
    _assert_fails(base + [str(tmp_path / "nope.h5ad")], 1, "nope.h5ad: file not found", out)
    no_xy = ad.read_h5ad(paths[1])
    del no_xy.obsm["spatial"]
    bad = tmp_path / "noxy.h5ad"
    no_xy.write_h5ad(bad)
    _assert_fails(base + [str(paths[0]), str(bad)], 1, "obsm['spatial'] is missing", out)
    _assert_fails(base + [*map(str, paths), "--label-key", "celltype"], 1,
                  "obs['celltype'] not found", out)
    _assert_fails(base + [*map(str, paths), "--n-domains", "1"], 2, "must be at least 2", out)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {epochs: [1,")
    _assert_fails(["run", "-o", str(out), "--config", str(broken), str(paths[0])], 2,
                  "cannot read config", out)
    _assert_fails(base + [str(paths[0]), "--cluster", "dbscan"], 2, "dbscan", out)
    _assert_fails(base + [str(paths[0]), "--keep-starts", "0"], 2, "--keep-starts", out)
    _assert_fails(base + [str(paths[0]), "--fanouts", "a,b"], 2, "--fanouts", out)
    blocker = tmp_path / "file_not_dir"
    blocker.write_text("x")
    _assert_fails(["run", "-o", str(blocker / "sub"), "--config", str(config), str(paths[0])], 2,
                  "not writable", None)
    _assert_fails(["evaluate", str(tmp_path / "none.h5ad"), "--label-key", "x"], 1,
                  "none.h5ad: file not found")
    plan = tmp_path / "plan.yaml"
    plan.write_text("datasets: [")
    _assert_fails(["benchmark", str(plan), "-o", str(tmp_path / "b")], 2, "invalid YAML")


def test_ctrl_c_leaves_no_partial_files(slice_files, tmp_path, monkeypatch):
    import spamask_integrate.io as sio

    paths, config = slice_files
    real = sio._write_figures

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sio, "_write_figures", interrupted)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["-q", "run", *map(str, paths), "-o", str(out), "--config",
                                    str(config), "--no-scib", "--k", "6"])
    assert res.exit_code == 130
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.skipif(shutil.which("spamask-integrate") is None,
                    reason="console script not installed (pip install -e .)")
def test_console_script_subprocess(slice_files, tmp_path):
    version = subprocess.run(["spamask-integrate", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "spamask-integrate" in version.stdout
    res = subprocess.run(["spamask-integrate", "run", str(tmp_path / "absent.h5ad"), "-o",
                          str(tmp_path / "o")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 1
    assert "Error: " in res.stderr and "absent.h5ad" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()
    help_text = subprocess.run(["spamask-integrate", "run", "--help"], capture_output=True,
                               text=True).stdout
    assert "Examples:" in help_text and "--minibatch" in help_text


def test_run_one_atlas_file_split_by_slice_column(tiny_slices, slice_files, tmp_path):
    _, config = slice_files
    atlas = tiny_slices.copy()
    atlas.obs["sample"] = atlas.obs.pop("slice").astype(str)
    atlas.obs_names = [f"cell{i}" for i in range(atlas.n_obs)]
    atlas.layers, atlas.uns = {}, {}
    atlas.write_h5ad(tmp_path / "atlas.h5ad")
    out = tmp_path / "out"
    res = _run(["-q", "run", str(tmp_path / "atlas.h5ad"), "--slice-column", "sample", "-o",
                str(out), "--label-key", "ground_truth", "--n-domains", "4", "--k", "6",
                "--config", str(config), "--no-scib"])
    assert res.exit_code == 0, res.output
    domains = pd.read_csv(out / "domains.csv")
    assert sorted(domains["slice"].unique()) == ["slice0", "slice1"]
    assert json.loads((out / "run.json").read_text())["n_slices"] == 2
    _assert_fails(["run", str(tmp_path / "atlas.h5ad"), "--slice-column", "donor", "-o",
                   str(tmp_path / "out2"), "--config", str(config)], 1,
                  "atlas.h5ad: slice column obs['donor'] not found", tmp_path / "out2")


_JIT = ("import sys; from spamask_integrate.utils import enable_compile_cache as enable; "
        "where = enable(sys.argv[1]); import jax, jax.numpy as jnp; "
        "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready(); print(where)")


def _no_jax_cache_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                                 "NUMBA_CACHE_DIR"))}


def test_compile_cache_keeps_what_jax_compiles(tmp_path):
    env = _no_jax_cache_env()
    res = subprocess.run([sys.executable, "-c", _JIT, str(tmp_path / "c")], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "c" / "jax")
    assert any((tmp_path / "c" / "jax").iterdir()), "jax wrote nothing to the cache"
    # a cache directory the user set for jax is kept, and ours is not created
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "theirs")
    res = subprocess.run([sys.executable, "-c", _JIT, str(tmp_path / "d")], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "theirs")
    assert not (tmp_path / "d" / "jax").exists()


# a module whose numba kernel is defined without cache=True, as umap's and pynndescent's are
_NUMBA_MODULE = "import numba\n\n@numba.njit\ndef plus_one(x):\n    return x + 1\n"
_NUMBA = ("import sys; sys.path.insert(0, sys.argv[2]); from spamask_integrate.utils import "
          "enable_compile_cache, import_with_numba_cache; "
          "sys.argv[1] != '-' and enable_compile_cache(sys.argv[1]); "
          "import numba; before = numba.njit; m = import_with_numba_cache('kernels'); "
          "assert numba.njit is before, 'decorator not restored'; "
          "assert m.plus_one(1.0) == 2.0; "
          "print(sum(m.plus_one.stats.cache_hits.values()))")


def test_compile_cache_keeps_the_numba_kernels_an_import_defines(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "kernels.py").write_text(_NUMBA_MODULE)
    env = _no_jax_cache_env()

    def loaded_from_cache(cache: str) -> int:
        res = subprocess.run([sys.executable, "-c", _NUMBA, cache, str(tmp_path / "src")],
                             env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return int(res.stdout.strip())

    assert loaded_from_cache("-") == 0  # no cache asked for: compiled, nothing kept
    assert loaded_from_cache("-") == 0
    assert not list((tmp_path / "src").rglob("*.nbi"))
    assert loaded_from_cache(str(tmp_path / "c")) == 0  # compiled and kept
    assert list((tmp_path / "c" / "numba").rglob("*.nbi"))
    assert loaded_from_cache(str(tmp_path / "c")) == 1  # the next process loads it


def test_signature_kernels_of_lazy_packages_compile_at_first_call(tmp_path, monkeypatch):
    numba = pytest.importorskip("numba")
    from spamask_integrate.utils import import_with_numba_cache

    body = "import numba\n\n@numba.njit('f8(f8)')\ndef plus_one(x):\n    return x + 1\n"
    for name in ("eager_kernels", "lazy_kernels"):
        (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    eager = import_with_numba_cache("eager_kernels", lazy=("lazy_kernels",))
    lazy = import_with_numba_cache("lazy_kernels", lazy=("lazy_kernels",))
    assert len(eager.plus_one.signatures) == 1  # compiled at import, as numba does
    assert lazy.plus_one.signatures == []  # nothing compiled yet
    assert lazy.plus_one(1.0) == eager.plus_one(1.0) == 2.0
    assert len(lazy.plus_one.signatures) == 1


@pytest.mark.skipif(shutil.which("spamask-integrate") is None,
                    reason="console script not installed (pip install -e .)")
def test_cli_cache_dir_and_no_cache(tmp_path):
    env = _no_jax_cache_env()
    args = ["report", str(tmp_path / "absent")]  # any command: the group sets the cache up
    res = subprocess.run(["spamask-integrate", "-vv", "--cache-dir", str(tmp_path / "c"),
                          *args], env=env, capture_output=True, text=True)
    assert f"jax compilation cache: {tmp_path / 'c' / 'jax'}" in res.stderr
    assert (tmp_path / "c" / "jax").is_dir()
    res = subprocess.run(["spamask-integrate", "-vv", "--no-cache", *args],
                         env={**env, "SPAMASK_CACHE_DIR": str(tmp_path / "e")},
                         capture_output=True, text=True)
    assert "jax compilation cache" not in res.stderr and not (tmp_path / "e").exists()
