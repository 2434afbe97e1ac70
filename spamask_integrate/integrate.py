"""Batch correction of an embedding across slices with Harmony (harmonypy)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np

from .config import Keys
from .errors import DependencyError, InputError
from .utils import batch_codes, record, require_obsm

logger = logging.getLogger(__name__)


def integrate(
    adata: ad.AnnData,
    batch_key: str = Keys.BATCH,
    use_rep: str = Keys.EMB,
    key_added: str = Keys.EMB_HARMONY,
    *,
    n_pcs: int | None = 30,
    theta: float = 2.0,
    max_iter: int = 20,
    seed: int = 0,
    copy: bool = False,
) -> ad.AnnData | None:
    """Remove slice effects from ``obsm[use_rep]`` with Harmony.

    The embedding is first reduced to ``n_pcs`` principal components (seeded; skipped when it
    has no more columns, or with ``n_pcs=None``), as Harmony expects. With one slice nothing is
    corrected: ``obsm[key_added]`` is the (reduced) embedding and the record says so.

    Reads ``obsm[use_rep]``, ``obs[batch_key]``. Writes ``obsm[key_added]`` (cells x dims) and
    ``uns["spamask"]["integrate"]``.
    """
    require_obsm(adata, use_rep)
    codes = batch_codes(adata, batch_key)
    adata = adata.copy() if copy else adata
    x = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    if n_pcs is not None and x.shape[1] > n_pcs:
        from sklearn.decomposition import PCA

        x = PCA(n_pcs, random_state=seed).fit_transform(x)
    n_batches = len(np.unique(codes))
    if n_batches < 2:
        logger.info("integrate: one slice, Harmony skipped")
        z = x
    else:
        z = _harmony(x, adata.obs[[batch_key]], batch_key, theta, max_iter, seed)
    adata.obsm[key_added] = z.astype(np.float32)
    record(adata, "integrate", {"method": "harmony" if n_batches > 1 else "none",
                                "use_rep": use_rep, "key_added": key_added, "batch_key": batch_key,
                                "n_pcs": n_pcs or 0, "theta": theta, "max_iter": max_iter,
                                "seed": seed})
    return adata if copy else None


def _harmony(x: np.ndarray, meta, batch_key: str, theta: float, max_iter: int,
             seed: int) -> np.ndarray:
    try:
        import harmonypy
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise DependencyError("harmonypy is not installed: pip install harmonypy") from exc
    meta = meta.copy()
    meta[batch_key] = meta[batch_key].astype(str)
    ho = harmonypy.run_harmony(x, meta, [batch_key], theta=theta, max_iter_harmony=max_iter,
                               random_state=seed, verbose=False)
    return cells_by_dims(ho.Z_corr, *x.shape)


def cells_by_dims(z, n_cells: int, n_dims: int) -> np.ndarray:
    """Harmony's corrected matrix as cells x dims.

    harmonypy 0.0.x returns ``Z_corr`` as dims x cells, 2.x as cells x dims; the shape tells
    which, and for a square matrix the installed version does.
    """
    z = np.asarray(z)
    if z.shape == (n_cells, n_dims) and (n_cells != n_dims or _harmony_major() >= 2):
        return z
    if z.shape == (n_dims, n_cells):
        return z.T
    raise InputError(f"Harmony returned shape {z.shape} for {n_cells} cells x {n_dims} dims")


def _harmony_major() -> int:
    from importlib.metadata import version

    return int(version("harmonypy").split(".")[0])
