"""Figures of a run. Each function returns a ``matplotlib.figure.Figure`` built without pyplot,
so no global plotting state is touched; save it with ``fig.savefig(path)``."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .config import Keys
from .utils import exact_knn, import_with_numba_cache, require_obs, require_obsm


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


MAX_SLICE_PANELS = 24


def shown_slices(slices: list, max_slices: int | None = MAX_SLICE_PANELS) -> list:
    """The slices a per-slice figure draws: all, or ``max_slices`` evenly spaced over the
    list (first and last included), so an atlas of hundreds of slices gives a readable page."""
    if max_slices is None or len(slices) <= max_slices:
        return list(slices)
    keep = np.unique(np.linspace(0, len(slices) - 1, max_slices).round().astype(int))
    return [slices[i] for i in keep]


def spatial_domains(adata: ad.AnnData, domain_key: str = Keys.DOMAIN,
                    batch_key: str = Keys.BATCH, *, ncols: int = 4,
                    spot_size: float | None = None,
                    max_slices: int | None = MAX_SLICE_PANELS) -> Figure:
    """One panel per slice (at most ``max_slices``, evenly spaced, see :func:`shown_slices`),
    spots coloured by domain with the same colours in every panel."""
    require_obs(adata, domain_key)
    require_obs(adata, batch_key)
    require_obsm(adata, Keys.SPATIAL)
    all_slices = list(adata.obs[batch_key].cat.categories)
    slices = shown_slices(all_slices, max_slices)
    cats = list(adata.obs[domain_key].cat.categories)
    colours = _palette(len(cats))
    ncols = min(ncols, len(slices))
    nrows = int(np.ceil(len(slices) / ncols))
    fig = Figure(figsize=(3.6 * ncols + 1.2, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    codes = adata.obs[domain_key].cat.codes.to_numpy()
    xy = np.asarray(adata.obsm[Keys.SPATIAL])
    for ax, name in zip(axes, slices):
        m = (adata.obs[batch_key] == name).to_numpy()
        size = spot_size or max(0.2, min(12.0, 9000 / max(m.sum(), 1)))
        ax.scatter(xy[m, 0], xy[m, 1], c=[colours[c] for c in codes[m]], s=size,
                   linewidths=0, rasterized=True)
        ax.set_title(str(name), fontsize=10)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(slices):]:
        ax.set_axis_off()
    handles = [_dot(colours[i], c) for i, c in enumerate(cats)]
    fig.legend(handles=handles, title=domain_key, loc="outside right center", frameon=False)
    if len(slices) < len(all_slices):
        fig.suptitle(f"{len(slices)} of {len(all_slices)} slices, evenly spaced")
    return fig


def _dot(colour, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="o", linestyle="", color=colour, label=str(label))


def _exact_knn(x: np.ndarray, k: int):
    """UMAP's precomputed (indices, distances): exact, so that umap-learn does not build a
    pynndescent index above 4,096 points; a figure shows at most 30,000 points."""
    ind, dist = exact_knn(x, min(k, len(x)))
    return ind, dist.astype(np.float32)


def umap(adata: ad.AnnData, use_rep: str = Keys.EMB, color: tuple[str, ...] = (Keys.DOMAIN,
                                                                            Keys.BATCH),
         *, max_spots: int = 30_000, seed: int = 0) -> Figure:
    """UMAP of ``obsm[use_rep]`` coloured by each ``obs`` column in ``color``.

    Computed on a seeded sample of at most ``max_spots`` spots (and not stored).
    """
    umap_learn = import_with_numba_cache("umap")
    require_obsm(adata, use_rep)
    for key in color:
        require_obs(adata, key)
    rng = np.random.default_rng(seed)
    idx = np.arange(adata.n_obs)
    if adata.n_obs > max_spots:
        idx = np.sort(rng.choice(adata.n_obs, max_spots, replace=False))
    x = np.asarray(adata.obsm[use_rep], dtype=np.float32)[idx]
    with warnings.catch_warnings():  # no search index: we never transform new points
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        emb = umap_learn.UMAP(n_neighbors=15, random_state=seed, n_jobs=1,
                              precomputed_knn=_exact_knn(x, 15)).fit_transform(x)
    fig = Figure(figsize=(4.6 * len(color) + 1.5, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(color), squeeze=False)).ravel()
    order = rng.permutation(len(idx))
    for ax, key in zip(axes, color):
        values = adata.obs[key].iloc[idx]
        cats = list(values.cat.categories)
        colours = _palette(len(cats))
        codes = values.cat.codes.to_numpy()
        ax.scatter(emb[order, 0], emb[order, 1], c=[colours[c] for c in codes[order]],
                   s=max(0.5, min(8.0, 6000 / len(idx))), linewidths=0, rasterized=True)
        ax.set_title(f"{use_rep} by {key}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(handles=[_dot(colours[i], c) for i, c in enumerate(cats)][:20], fontsize=7,
                  frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def scores(metrics: pd.DataFrame) -> Figure:
    """Bar charts: ARI/NMI per slice (when labels were given) and scib totals per embedding."""
    dom = metrics[(metrics["kind"] == "domain") & metrics["metric"].isin(["ARI", "NMI"])]
    integ = metrics[(metrics["kind"] == "integration") & metrics["metric"].isin(
        ["Bio conservation", "Batch correction", "Total"])]
    spatial = metrics[(metrics["kind"] == "spatial") & (metrics["metric"] == "neighbour_agreement")]
    panels = [p for p in (("domain accuracy", dom, "scope"), ("integration (scib-metrics)",
                          integ, "embedding"), ("spatial coherence", spatial, "scope"))
              if len(p[1])]
    fig = Figure(figsize=(5.2 * max(len(panels), 1), 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1), squeeze=False)).ravel()
    for ax, (title, table, group) in zip(axes, panels):
        wide = table.pivot_table(index=group, columns="metric", values="value", sort=False)
        width = 0.8 / max(wide.shape[1], 1)
        for j, col in enumerate(wide.columns):
            ax.bar(np.arange(len(wide)) + j * width, wide[col].to_numpy(), width, label=col)
        ax.set_xticks(np.arange(len(wide)) + 0.4 - width / 2)
        ax.set_xticklabels([str(i) for i in wide.index], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, frameon=False)
    return fig


def domain_maps(adata: ad.AnnData, domain_key: str = Keys.DOMAIN, batch_key: str = Keys.BATCH,
                label_key: str | None = None, *, max_spots: int = 20_000,
                seed: int = 0, max_slices: int | None = MAX_SLICE_PANELS) -> Figure:
    """Per slice, the domains and (with ``label_key``) the ground truth side by side.

    Domains keep one colour across slices; each label takes the colour of the domain that
    overlaps it most (one to one), so a match reads at a glance; spots without a label are
    grey. Each panel shows at most ``max_spots`` spots (a seeded sample) and at most
    ``max_slices`` slices are drawn (:func:`shown_slices`), so a report of a million spots
    in hundreds of slices stays small.
    """
    require_obs(adata, domain_key)
    require_obs(adata, batch_key)
    require_obsm(adata, Keys.SPATIAL)
    keys = [domain_key] + ([label_key] if label_key else [])
    for key in keys:
        require_obs(adata, key)
    slices = shown_slices(list(adata.obs[batch_key].cat.categories), max_slices)
    slots = [(s, key) for s in slices for key in keys]  # pairs stay on one row (4 columns)
    ncols = min(len(slots), 4)
    nrows = int(np.ceil(len(slots) / ncols))
    fig = Figure(figsize=(3.3 * ncols + 1.8, 3.3 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    xy = np.asarray(adata.obsm[Keys.SPATIAL])
    slice_of = adata.obs[batch_key].to_numpy()
    rng = np.random.default_rng(seed)
    legends = {}
    for key in keys:
        values = adata.obs[key]
        if not isinstance(values.dtype, pd.CategoricalDtype):
            values = values.astype("category")
        cats = list(values.cat.categories)
        legends[key] = [cats, np.array(_palette(len(cats)) + [(0.8, 0.8, 0.8, 1.0)]),
                        values.cat.codes.to_numpy()]
    if label_key:  # each label takes the colour of the domain that overlaps it most
        legends[label_key][1] = _matched_colours(legends[domain_key], legends[label_key])
    for ax, (name, key) in zip(axes, slots):
        idx = np.flatnonzero(slice_of == name)
        if len(idx) > max_spots:
            idx = np.sort(rng.choice(idx, max_spots, replace=False))
        cats, colours, codes = legends[key]
        size = max(0.2, min(12.0, 9000 / max(len(idx), 1)))
        ax.scatter(xy[idx, 0], xy[idx, 1], c=colours[codes[idx]], s=size, linewidths=0,
                   rasterized=True)
        ax.set_title(f"{name}: {key}", fontsize=9)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(slots):]:
        ax.set_axis_off()
    for key, (cats, colours, _) in legends.items():
        handles = [_dot(colours[i], c) for i, c in enumerate(cats)][:30]
        fig.legend(handles=handles, title=key, loc="outside right upper" if key == domain_key
                   else "outside right lower", frameon=False, fontsize=7)
    return fig


def _matched_colours(domains, labels) -> np.ndarray:
    """Colours for the labels: matched one to one to the domains by the largest overlap
    (Hungarian assignment), the unmatched labels after the domains' colours, grey last."""
    from scipy.optimize import linear_sum_assignment

    d_cats, d_colours, d_codes = domains
    l_cats, _, l_codes = labels
    known = (l_codes >= 0) & (d_codes >= 0)
    overlap = np.zeros((len(l_cats), len(d_cats)))
    np.add.at(overlap, (l_codes[known], d_codes[known]), 1)
    rows, cols = linear_sum_assignment(-overlap)
    spare = _palette(len(d_cats) + len(l_cats))[len(d_cats):]
    colours = [None] * len(l_cats)
    for r, c in zip(rows, cols):
        colours[r] = tuple(d_colours[c])
    for i in range(len(l_cats)):
        if colours[i] is None:
            colours[i] = spare.pop(0)
    return np.array(colours + [(0.8, 0.8, 0.8, 1.0)])


def loss_curves(loss, sce, edge, lam: float | None = None) -> Figure:
    """Training losses per epoch: the total, the node channel (SCE) and the edge channel."""
    fig = Figure(figsize=(6.0, 3.4), layout="constrained")
    ax = fig.subplots()
    epochs = np.arange(1, len(loss) + 1)
    ax.plot(epochs, loss, label="total", color="black")
    ax.plot(epochs, sce, label="SCE (masked spots)")
    ax.plot(epochs, edge, label="edge BCE" + (f" (weight {lam:g})" if lam is not None else ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(frameon=False, fontsize=8)
    return fig
