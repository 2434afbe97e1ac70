"""Slice-sharded runs: which rank reads which slices, and the collectives they share.

In a sharded run (``spamask-integrate run --nproc N --shard-slices``) no process holds the whole
atlas. Slices share no edge of the spatial graph, so each rank reads, preprocesses, trains on
and embeds only its own slices:

- :func:`plan_shards` gives every slice to a rank, balanced by spot count (largest slice to the
  least-loaded rank), from the sources alone: an h5ad's ``obs`` is read, never its counts;
- :func:`read_shard` reads this rank's slices (rows of an atlas file through a backed h5ad) and
  keeps the genes every slice of every rank has, in the order a single process would;
- :class:`Collective` sums, gathers and broadcasts numpy arrays over ``torch.distributed``;
  :func:`spamask_integrate.preprocess` takes it to combine gene statistics and the Gram matrix,
  so each rank gets the genes and the PCA of the whole atlas.

The training loop and the gathering of the embeddings are in
:mod:`spamask_integrate.distributed` (``shard_worker``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .config import Keys
from .errors import ConfigError, InputError
from .io import SliceSource, _as_sources, _read_one, read_slices, slice_categories

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- collectives
class Collective:
    """Sums, maxima, gathers and broadcasts of numpy arrays across the ranks of
    ``torch.distributed`` (gloo on CPU). Without an initialised process group it is the
    collective of one process: every operation returns its input."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world = self._dist.get_world_size() if self._dist else 1

    def sum(self, a: Any) -> np.ndarray:
        """Element-wise sum over the ranks (float64 for floats, int64 for integers)."""
        a = np.asarray(a)
        dtype = np.float64 if np.issubdtype(a.dtype, np.floating) else np.int64
        if self._dist is None:
            return a.astype(dtype, copy=False)
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
        self._dist.all_reduce(t)
        return t.numpy()

    def max(self, value: int) -> int:
        if self._dist is None:
            return int(value)
        import torch

        t = torch.tensor([int(value)], dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, a: Any) -> np.ndarray:
        """Rank 0's array, on every rank (same shape and dtype on every rank)."""
        a = np.asarray(a)
        if self._dist is None:
            return a
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a))
        self._dist.broadcast(t, src=0)
        return t.numpy()

    def allgather(self, obj: Any) -> list:
        """Every rank's (picklable) object, in rank order, on every rank."""
        if self._dist is None:
            return [obj]
        out: list = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list | None:
        """Every rank's object, in rank order, on rank 0 (``None`` elsewhere)."""
        if self._dist is None:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0)
        return out


# ---------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlannedSlice:
    """One slice of a sharded run: its source, its spot count and the rank that reads it."""

    source: SliceSource
    n_spots: int
    rank: int


def plan_shards(sources: Any, world: int, *, slice_column: str | None = None) -> list[PlannedSlice]:
    """Every slice of ``sources`` (paths or a manifest, as :func:`read_slices` takes), in input
    order, with the rank that reads it.

    Slices go, largest first, to the rank with the fewest spots so far (ties: the lower rank),
    so ranks get about equal spot counts. Spot counts come from an h5ad's ``obs`` alone (its
    counts are not read); other formats are read once, one at a time. A file with a slice
    column (``slice_column`` or a manifest row's own) gives one slice per value.
    """
    if world < 1:
        raise ConfigError(f"world={world}: a sharded run needs at least one rank")
    slices: list[tuple[SliceSource, int]] = []
    for src in _as_sources(sources):
        column = src.slice_column or slice_column
        obs = _obs_only(src)
        if column:
            cats = slice_categories(obs, column, str(src.path))
            sizes = np.bincount(cats.codes, minlength=len(cats.categories))
            slices += [(SliceSource(src.path, str(v), None, src.platform, src.label_key, column),
                        int(s)) for v, s in zip(cats.categories, sizes)]
        else:
            slices.append((src, len(obs)))
    names = [s.name for s, _ in slices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"duplicated slice name(s): {', '.join(dup)}; give each slice its own name")
    if len(slices) < world:
        raise ConfigError(f"{len(slices)} slices for {world} ranks: a sharded run gives each rank "
                          "at least one slice; use fewer processes")
    load = np.zeros(world, dtype=np.int64)
    rank_of = {}
    for i in sorted(range(len(slices)), key=lambda i: (-slices[i][1], i)):
        r = int(np.argmin(load))
        rank_of[i] = r
        load[r] += slices[i][1]
    return [PlannedSlice(src, n, rank_of[i]) for i, (src, n) in enumerate(slices)]


def _obs_only(src: SliceSource) -> pd.DataFrame:
    """A source's ``obs`` without its counts: h5ad files through h5py, others read whole."""
    path = src.path
    if path.is_file() and path.name.lower().endswith(".h5ad"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                return ad.io.read_elem(f["obs"])
        except Exception as exc:
            raise InputError(f"{path}: cannot read obs ({exc.__class__.__name__}: {exc})") from exc
    return _read_one(src).obs


# ---------------------------------------------------------------------------- reading a shard
def read_shard(plan: list[PlannedSlice], rank: int, comm: Collective, *,
               batch_key: str = Keys.BATCH, label_key: str | None = None,
               min_spots: int = 7) -> ad.AnnData:
    """This rank's slices of ``plan`` as one AnnData, as :func:`read_slices` would give them
    within the whole atlas: genes shared by all slices of all ranks, in the first slice's
    order; ``obs[batch_key]`` has every slice of the plan as a category, in plan order."""
    mine = [p.source for p in plan if p.rank == rank]
    names = [p.source.name for p in plan]
    adata = read_slices([_whole_file(s) for s in _files(mine)], batch_key=batch_key,
                        label_key=label_key, min_spots=min_spots,
                        select={s.name for s in mine}, counts_layer=False)
    # the genes of every slice everywhere, in the order of the plan's first slice
    per_rank = comm.allgather(list(adata.var_names))
    shared = set.intersection(*map(set, per_rank))
    genes = [g for g in per_rank[plan[0].rank] if g in shared]
    if not genes:
        raise InputError("the slices share no gene names across the shards")
    if genes != list(adata.var_names):  # (a copy of the counts: only when genes differ)
        adata._inplace_subset_var(adata.var_names.get_indexer(genes))
    adata.obs[batch_key] = pd.Categorical(adata.obs[batch_key].astype(str), categories=names)
    adata.uns[Keys.UNS]["read"].update(slices=names, n_genes_kept=len(genes),
                                       shard_rank=rank, shard_slices=[s.name for s in mine])
    logger.info("rank %d: read %d of %d slices, %d spots, %d shared genes", rank, len(mine),
                len(names), adata.n_obs, len(genes))
    return adata


def _files(sources: list[SliceSource]) -> list[SliceSource]:
    """The distinct files behind ``sources`` (an atlas file appears once), in order."""
    seen, out = set(), []
    for s in sources:
        key = (s.path, s.slice_column)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _whole_file(src: SliceSource) -> SliceSource:
    """The file a planned slice comes from (for an atlas file: named by the file, not a slice)."""
    if src.slice_column is None:
        return src
    return SliceSource(Path(src.path), Path(src.path).stem, src.coordinates, src.platform,
                       src.label_key, src.slice_column)
