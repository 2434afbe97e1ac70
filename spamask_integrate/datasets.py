"""Seeded synthetic multi-slice tissue with known domains and planted slice effects."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .config import Keys
from .errors import ConfigError

TRUTH_KEY = "ground_truth"


def synthetic_slices(
    n_slices: int = 2,
    n_spots_per_slice: int = 500,
    n_genes: int = 200,
    n_domains: int = 5,
    *,
    batch_effect: float = 0.5,
    noise: float = 0.5,
    marker_fold: float = 2.5,
    dispersion: float = 5.0,
    depth: float = 2.0,
    seed: int = 0,
    batch_key: str = Keys.BATCH,
    chunk_size: int = 100_000,
) -> ad.AnnData:
    """Simulate serial tissue sections with layered and patchy domains.

    Each slice is a jittered square grid. ``n_domains - 1`` wavy layers run across it (their
    waves shift a little from slice to slice, as in serial sections) and the last domain forms
    round patches. Every domain up-regulates its own marker genes by ``marker_fold``; each spot
    adds log-normal noise (``noise``), so single spots are ambiguous while neighbourhoods are not.
    Each slice gets a gene-wise scaling (log-normal, sd ``batch_effect``) and an additive shift,
    the batch effect. Counts are negative binomial (gamma-Poisson, ``dispersion``) and built in
    chunks of ``chunk_size`` spots, so a million spots never need a dense matrix.

    Returns
    -------
    AnnData: raw counts in ``X`` and ``layers["counts"]`` (CSR float32), ``obsm["spatial"]``,
    ``obs[batch_key]`` (categorical), ``obs["ground_truth"]`` (domain names),
    ``var["marker_of"]`` (the domain a gene marks; missing for non-markers), and the
    generating parameters in ``uns["synthetic"]``.
    """
    if n_slices < 1 or n_spots_per_slice < 4 or n_genes < n_domains or n_domains < 2:
        raise ConfigError("synthetic_slices needs n_slices >= 1, n_spots_per_slice >= 4, "
                          "n_domains >= 2 and n_genes >= n_domains")
    rng = np.random.default_rng(seed)
    log_base = rng.normal(np.log(depth), 0.8, size=n_genes)
    profiles = np.tile(log_base, (n_domains, 1))
    markers = rng.permutation(n_genes)[: (n_genes // n_domains) * n_domains].reshape(n_domains, -1)
    for d in range(n_domains):
        profiles[d, markers[d]] += np.log(marker_fold)
    coords, domains, slices, blocks = [], [], [], []
    for s in range(n_slices):
        xy, dom = _layout(n_spots_per_slice, n_domains, rng, phase=0.3 * s)
        scale = rng.normal(0.0, batch_effect, size=n_genes)
        shift = rng.exponential(0.2 * batch_effect * depth, size=n_genes) if batch_effect else 0
        for start in range(0, n_spots_per_slice, chunk_size):
            sl = slice(start, min(start + chunk_size, n_spots_per_slice))
            log_mu = profiles[dom[sl]] + scale + rng.normal(0, noise, (len(dom[sl]), n_genes))
            lib = rng.lognormal(0.0, 0.2, size=(len(dom[sl]), 1))
            mean = np.exp(log_mu) * lib + shift
            lam = rng.gamma(dispersion, mean / dispersion)
            blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
        coords.append(xy)
        domains.append(dom)
        slices.append(np.full(n_spots_per_slice, s))
    x = sp.vstack(blocks).tocsr()
    names = [f"slice{s}" for s in range(n_slices)]
    slice_idx = np.concatenate(slices)
    dom_all = np.concatenate(domains)
    domain_names = [f"D{d}" for d in range(n_domains)]
    obs = pd.DataFrame({
        batch_key: pd.Categorical.from_codes(slice_idx, categories=names),
        TRUTH_KEY: pd.Categorical.from_codes(dom_all, categories=domain_names),
    }, index=[f"{names[s]}_spot{i}" for s, n in zip(range(n_slices), [n_spots_per_slice] * n_slices)
              for i in range(n)])
    marker_code = np.full(n_genes, -1)
    marker_code[markers.ravel()] = np.repeat(np.arange(n_domains), markers.shape[1])
    var = pd.DataFrame({"marker_of": pd.Categorical.from_codes(marker_code, domain_names)},
                       index=[f"gene{g}" for g in range(n_genes)])
    adata = ad.AnnData(x, obs=obs, var=var)
    adata.layers[Keys.COUNTS] = x
    adata.obsm[Keys.SPATIAL] = np.concatenate(coords)
    adata.uns["synthetic"] = {
        "n_slices": n_slices, "n_spots_per_slice": n_spots_per_slice, "n_genes": n_genes,
        "n_domains": n_domains, "batch_effect": batch_effect, "noise": noise,
        "marker_fold": marker_fold, "dispersion": dispersion, "depth": depth, "seed": seed,
    }
    adata.uns[Keys.UNS] = {"read": {"slices": np.asarray(names, dtype=object),
                                    "platforms": {n: "imaging" for n in names},
                                    "batch_key": batch_key, "label_key": TRUTH_KEY}}
    return adata


def _layout(n: int, n_domains: int, rng: np.random.Generator,
            phase: float) -> tuple[np.ndarray, np.ndarray]:
    """Jittered grid coordinates (spacing 1) and their domain index."""
    side = int(np.ceil(np.sqrt(n)))
    grid = np.stack(np.divmod(np.arange(n), side), axis=1)[:, ::-1].astype(np.float64)
    xy = grid + rng.uniform(-0.25, 0.25, size=grid.shape)
    u, v = xy[:, 0] / side, xy[:, 1] / side
    n_layers = n_domains - 1
    t = v + 0.06 * np.sin(2 * np.pi * (1.5 * u + phase))
    dom = np.clip((t * n_layers).astype(np.int64), 0, n_layers - 1)
    centres = rng.uniform(0.15, 0.85, size=(3, 2))
    radius = 0.35 / np.sqrt(n_layers + 1)
    for cx, cy in centres:
        dom[(u - cx) ** 2 + (v - cy) ** 2 < radius**2] = n_domains - 1
    return xy, dom


def tile_slices(
    adata: ad.AnnData,
    n_spots: int,
    *,
    batch_key: str = Keys.BATCH,
    depth: tuple[float, float] = (0.4, 1.0),
    gene_effect: float = 0.3,
    missing_genes: float = 0.01,
    min_spots: int = 100,
    seed: int = 0,
) -> ad.AnnData:
    """A large labelled dataset made of perturbed copies ("replicas") of real slices.

    Replica ``r`` copies source slice ``r mod S`` (S = the slices of ``adata``) and is its own
    slice, named ``<source>_r<r>``. Each replica:

    - thins the counts binomially: spot counts ``c`` become ``Binomial(c, p_g)`` with
      ``p_g = depth_r * exp(gene_effect * z_g)`` clipped to [0, 1], ``depth_r`` drawn uniformly
      from ``depth`` and ``z_g`` a standard normal per gene and replica (a gene-wise batch
      effect); the counts stay integers and never exceed the source's;
    - loses a share ``missing_genes`` of its genes (counts 0, as a failed probe; listed in
      ``uns["tiling"]["missing_genes"]``);
    - is rotated by a random angle about its centre and shifted to its own place on a grid,
      so replicas do not overlap (distances within a replica are kept).

    Whole replicas are added until ``n_spots`` is reached; the last one is a spatial crop
    (the spots first along a random direction) of the spots still needed, or is left out
    when fewer than ``min_spots`` remain, so the result has between ``n_spots - min_spots``
    and ``n_spots`` spots. Every ``obs`` column (the labels) is carried over, with
    ``obs["source_slice"]``; ``obs_names`` are ``<replica>_<source name>``.

    ``adata`` holds raw counts in ``layers["counts"]`` (else ``X``), ``obsm["spatial"]`` and
    ``obs[batch_key]``. Counts are stored as given (sparse), so at 10^6 spots subset the genes
    first (e.g. to the highly variable ones): the result's non-zeros are about the sources'
    per-spot non-zeros times ``n_spots``.
    """
    if batch_key not in adata.obs:
        raise ConfigError(f"tile_slices: obs[{batch_key!r}] not found")
    if Keys.SPATIAL not in adata.obsm:
        raise ConfigError("tile_slices: obsm['spatial'] not found")
    lo, hi = depth
    if not 0 < lo <= hi <= 1 or gene_effect < 0 or not 0 <= missing_genes < 1:
        raise ConfigError("tile_slices needs 0 < depth[0] <= depth[1] <= 1, gene_effect >= 0 "
                          "and 0 <= missing_genes < 1")
    if n_spots < min_spots:
        raise ConfigError(f"tile_slices: n_spots={n_spots} is below min_spots={min_spots}")
    counts = sp.csr_matrix(adata.layers[Keys.COUNTS] if Keys.COUNTS in adata.layers else adata.X)
    if counts.nnz and not np.array_equal(counts.data, np.round(counts.data)):
        raise ConfigError("tile_slices needs raw integer counts (layers['counts'] or X)")
    codes = pd.Categorical(adata.obs[batch_key]).codes
    names = list(pd.Categorical(adata.obs[batch_key]).categories)
    sources = [np.flatnonzero(codes == s) for s in range(len(names))]
    xy_all = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)
    span = max(np.ptp(xy_all[idx], axis=0).max() for idx in sources)
    n_genes = counts.shape[1]
    n_missing = int(round(missing_genes * n_genes))
    rng = np.random.default_rng(seed)

    plan, total = [], 0
    while total < n_spots:
        r = len(plan)
        take = min(len(sources[r % len(sources)]), n_spots - total)
        if take < min_spots and plan:
            break
        plan.append(take)
        total += take
    side = int(np.ceil(np.sqrt(len(plan))))
    blocks, coords, rows, replica_names, missing = [], [], [], [], {}
    for r, take in enumerate(plan):
        s = r % len(sources)
        idx = sources[s]
        xy = xy_all[idx] - xy_all[idx].mean(axis=0)
        angle = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        xy = xy @ rot.T
        if take < len(idx):  # a spatial crop: the spots first along a random direction
            direction = rng.normal(size=2)
            keep = np.sort(np.argsort(xy @ direction, kind="stable")[:take])
            idx, xy = idx[keep], xy[keep]
        cell = np.array(divmod(r, side), dtype=np.float64)[::-1]
        xy = xy + 1.5 * span * cell + rng.uniform(-0.1, 0.1, size=2) * span
        p = np.clip(rng.uniform(lo, hi) * np.exp(gene_effect * rng.normal(size=n_genes)), 0, 1)
        lost = np.sort(rng.choice(n_genes, n_missing, replace=False)) if n_missing else []
        p[lost] = 0.0
        block = counts[idx].tocsr()
        block.data = rng.binomial(block.data.astype(np.int64), p[block.indices]).astype(np.float32)
        block.eliminate_zeros()
        blocks.append(block)
        coords.append(xy)
        rows.append(idx)
        name = f"{names[s]}_r{r}"
        replica_names.append(name)
        missing[name] = [str(adata.var_names[g]) for g in lost]
    rows_all = np.concatenate(rows)
    obs = adata.obs.iloc[rows_all].copy()
    replica = np.repeat(np.arange(len(plan)), plan)
    obs["source_slice"] = pd.Categorical([names[r % len(sources)] for r in replica],
                                         categories=names)
    obs[batch_key] = pd.Categorical.from_codes(replica, categories=replica_names)
    obs.index = [f"{replica_names[r]}_{b}" for r, b in zip(replica, adata.obs_names[rows_all])]
    x = sp.vstack(blocks).tocsr()
    out = ad.AnnData(x, obs=obs, var=adata.var.copy())
    out.layers[Keys.COUNTS] = x
    out.obsm[Keys.SPATIAL] = np.concatenate(coords)
    out.uns["tiling"] = {"n_replicas": len(plan), "sources": names, "depth": list(depth),
                         "gene_effect": gene_effect, "missing_genes": missing, "seed": seed}
    return out
