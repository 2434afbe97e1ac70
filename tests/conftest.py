"""Shared fixtures: small synthetic slices, and the real data in ../shared when present."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import spamask_integrate as si

torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DLPFC = SHARED / "dlpfc_donor3_paste2"

requires_dlpfc = pytest.mark.skipif(
    len(list(DLPFC.glob("*.h5ad"))) != 4,
    reason=f"shared DLPFC slices not found in {DLPFC} (../shared/data is absent)",
)


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """The command line keeps jax's compiled kernels in a cache directory: a temporary one
    here, never the user's ~/.cache."""
    import os

    before = os.environ.get("SPAMASK_CACHE_DIR")
    os.environ["SPAMASK_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        os.environ.pop("SPAMASK_CACHE_DIR", None)
    else:
        os.environ["SPAMASK_CACHE_DIR"] = before


@pytest.fixture
def tiny_slices():
    """Two synthetic slices of 300 spots, 120 genes, 4 domains, with a slice effect.

    Noisy enough that single spots are ambiguous (PCA + GMM reaches ARI ~0.15) while
    neighbourhoods are not (SpaMask ~0.7).
    """
    return si.datasets.synthetic_slices(2, 300, 120, 4, batch_effect=0.5, noise=1.0,
                                        marker_fold=1.6, seed=1)


@pytest.fixture
def tiny_prepped(tiny_slices):
    """``tiny_slices`` preprocessed to a 20-d PCA, with its kNN graph."""
    si.preprocess(tiny_slices, n_top_genes=None, n_comps=20, min_cells=5)
    graph = si.build_graph(tiny_slices, k=6)
    return tiny_slices, graph


def write_h5ad_slices(adata, folder: Path, batch_key: str = "slice") -> list[Path]:
    """Write each slice of ``adata`` as its own .h5ad with raw barcodes; return the paths."""
    paths = []
    for name in adata.obs[batch_key].cat.categories:
        part = adata[adata.obs[batch_key] == name].copy()
        part.obs_names = [n.split("_", 1)[1] for n in part.obs_names]
        del part.obs[batch_key]
        part.layers = {}
        part.uns = {}
        path = folder / f"{name}.h5ad"
        part.write_h5ad(path)
        paths.append(path)
    return paths


def assert_symmetric(graph) -> None:
    src, dst = (t.numpy() for t in graph.edges())
    n = graph.num_nodes()
    fwd = np.unique(src.astype(np.int64) * n + dst)
    bwd = np.unique(dst.astype(np.int64) * n + src)
    assert np.array_equal(fwd, bwd)


def write_plan_with_a_broken_dataset(paths, folder: Path) -> Path:
    """A benchmark plan: two baselines x two seeds on ``paths``, and a dataset whose file is
    missing (its combinations must fail and be reported, the others go on)."""
    plan = folder / "plan.yaml"
    plan.write_text(f"""
datasets:
  - name: good
    sources: [{paths[0]}, {paths[1]}]
    label_key: ground_truth
    n_domains: 4
    k: 6
  - name: broken
    sources: [{folder / 'missing.h5ad'}]
    label_key: ground_truth
settings:
  methods: [pca, smoothed_pca]
  harmony: [false]
  seeds: [0, 1]
  preprocess: {{n_top_genes: null, n_comps: 20, min_cells: 5}}
""")
    return plan


def write_slices_and_config(adata, folder: Path, config_text: str) -> tuple[list[Path], Path]:
    """``adata``'s slices as .h5ad files in ``folder/data`` and a run config ``folder/fast.yaml``."""
    data = folder / "data"
    data.mkdir()
    config = folder / "fast.yaml"
    config.write_text(config_text)
    return write_h5ad_slices(adata, data), config


@contextmanager
def logged_warnings(name: str):
    """The warnings the package logger ``name`` emits inside the block, as a list of their
    messages. A handler of its own: the CLI tests leave the package logger not propagating
    to pytest's caplog."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
