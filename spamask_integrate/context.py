"""What the domain caller sees: the SpaMask embedding beside the spatial context of the
model's own input.

The trained embedding carries what the encoder learned; on a panel of a few dozen genes
(osmFISH, 33) it is the weaker part and a neighbourhood average of the expression itself is
a strong domain signal (smoothed PCA alone scores about as well there). The context block is
BANKSY's construction applied to the model input ``obsm["X_pca"]``: each spot's input beside
the mean of its same-slice spatial neighbours, weighted ``sqrt(1 - lambda_)`` and
``sqrt(lambda_)``, reduced by PCA. Both blocks are centred and scaled to the same mean row
norm, and the context block is weighted by ``weight``. With the default 0.5 (and the caller's
60 starts of then) the osmFISH section scored 0.694 instead of 0.652 over 20 seeds and the
four DLPFC slices 0.577 instead of 0.582 over 30; ``weight=0`` gives the embedding alone
(benchmarks/README.md, "The caller's input: the embedding beside the input's spatial
context").
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import anndata as ad
import numpy as np

from .config import Keys
from .errors import ConfigError
from .utils import record, require_obsm

#: weight of the context block beside the embedding (each block at unit mean row norm)
CONTEXT_WEIGHT = 0.5
#: share of the neighbour mean in the context block, as BANKSY's lambda
CONTEXT_LAMBDA = 0.8


def context_embedding(
    adata: ad.AnnData,
    batch_key: str = Keys.BATCH,
    *,
    use_rep: str = Keys.EMB,
    input_rep: str = Keys.PCA,
    weight: float = CONTEXT_WEIGHT,
    lambda_: float = CONTEXT_LAMBDA,
    n_pcs: int = 30,
    n_context_pcs: int = 20,
    seed: int = 0,
    key_added: str = Keys.EMB_CONTEXT,
    copy: bool = False,
) -> ad.AnnData | None:
    """The embedding ``obsm[use_rep]`` (reduced to ``n_pcs`` principal components) beside
    the spatial context of ``obsm[input_rep]`` (``n_context_pcs`` components), the latter
    weighted by ``weight``; ``weight=0`` gives the reduced embedding alone.

    The context of a spot is ``[sqrt(1 - lambda_) * x, sqrt(lambda_) * mean of x over its
    same-slice spatial neighbours]`` (the neighbours of ``obsp["spamask_connectivities"]``,
    or 6 nearest per slice without it). The PCAs are seeded.

    Reads ``obsm[use_rep]``, ``obsm[input_rep]``, ``obs[batch_key]`` and the spatial graph.
    Writes ``obsm[key_added]`` (cells x ``n_pcs + n_context_pcs``, float32) and
    ``uns["spamask"]["context"]``.
    """
    from .cluster import reduce, same_slice_neighbours
    from .mixture import neighbour_share

    check_weight(weight)
    if not 0.0 <= lambda_ <= 1.0:
        raise ConfigError(f"context lambda_={lambda_}: must be in [0, 1]")
    if int(n_pcs) < 1 or int(n_context_pcs) < 1:
        raise ConfigError(f"n_pcs={n_pcs}, n_context_pcs={n_context_pcs}: must be positive")
    require_obsm(adata, use_rep, "train a model first")
    adata = adata.copy() if copy else adata
    emb = _unit(reduce(adata.obsm[use_rep], int(n_pcs), seed))
    blocks = [emb]
    if weight > 0:
        require_obsm(adata, input_rep, "run preprocess() first")
        # float32 throughout: at 10^6 spots and a PCA-200 input the block is 1.6 GB
        x = np.asarray(adata.obsm[input_rep], dtype=np.float32)
        share = neighbour_share(same_slice_neighbours(adata, batch_key), dtype=np.float32)
        mean = share @ x
        alone = np.asarray(share.sum(axis=1)).ravel() == 0
        mean[alone] = x[alone]  # a spot without a neighbour in its slice is its own context
        both = np.hstack([np.float32(np.sqrt(1.0 - lambda_)) * x,
                          np.float32(np.sqrt(lambda_)) * mean])
        del x, mean
        if both.shape[1] > n_context_pcs:
            from sklearn.decomposition import PCA

            both = PCA(int(n_context_pcs), random_state=seed).fit_transform(both)
        blocks.append(weight * _unit(both.astype(np.float64)))
    adata.obsm[key_added] = np.hstack(blocks).astype(np.float32)
    record(adata, "context", {"use_rep": use_rep, "input_rep": input_rep,
                              "weight": float(weight), "lambda": float(lambda_),
                              "n_pcs": int(emb.shape[1]),
                              "n_context_pcs": int(blocks[-1].shape[1]) if weight > 0 else 0,
                              "seed": seed, "key_added": key_added})
    return adata if copy else None


def caller_input(
    adata: ad.AnnData,
    batch_key: str = Keys.BATCH,
    *,
    weight: float = CONTEXT_WEIGHT,
    harmony: bool = True,
    seed: int = 0,
    step: Callable[[str], ContextManager] | None = None,
) -> tuple[str, str]:
    """From a trained ``obsm["X_spamask"]``, make what a run hands on; returns the keys
    ``(scored, clustered)``.

    ``scored`` is the embedding, Harmony-corrected across ``batch_key`` when ``harmony``
    (``X_spamask_harmony``, else ``X_spamask``): the UMAP and the scib metrics read it.
    ``clustered`` is what the domain caller clusters: with ``weight > 0`` the embedding
    beside the input's spatial context (:func:`context_embedding`), Harmony-corrected on its
    own (``X_spamask_context_harmony``); with ``weight=0`` the same as ``scored``. ``run``
    and the benchmark harness both call this, so they cluster and score the same things.
    ``step(name)``, if given, wraps the "context" and "integrate" stages (``run`` times them).
    """
    from .integrate import integrate

    check_weight(weight)
    step = step or (lambda name: nullcontext())
    clustered = Keys.EMB
    if weight > 0:
        with step("context"):
            context_embedding(adata, batch_key, weight=weight, seed=seed)
        clustered = Keys.EMB_CONTEXT
    if not harmony:
        return Keys.EMB, clustered
    corrected = {Keys.EMB: Keys.EMB_HARMONY, Keys.EMB_CONTEXT: Keys.EMB_CONTEXT_HARMONY}
    with step("integrate"):
        integrate(adata, batch_key, seed=seed)
        if clustered != Keys.EMB:
            integrate(adata, batch_key, use_rep=clustered, key_added=corrected[clustered],
                      seed=seed)
    return Keys.EMB_HARMONY, corrected[clustered]


def check_weight(weight: float) -> None:
    """Raise :class:`ConfigError` unless ``weight`` is a finite number >= 0 (``run`` checks it
    before training)."""
    if not 0 <= weight < float("inf"):
        raise ConfigError(f"context_weight={weight}: must be a finite number >= 0")


def _unit(x: np.ndarray) -> np.ndarray:
    """Centred, and scaled so that the mean squared row norm is 1."""
    x = x - x.mean(axis=0)
    scale = np.sqrt((x ** 2).sum(axis=1).mean())
    return x / scale if scale > 0 else x
