"""How each training step sees the graph: edge masks, negative pairs, blocks, tile subgraphs.

Three ways to cut a step out of the spatial graph, one per training mode of
:class:`spamask_integrate.train.Trainer`:

- the whole graph (full-graph training): only :class:`EdgeMasker` and :class:`NegativeSampler`;
- spatial tile subgraphs (:class:`TileSubgraphs`, Cluster-GCN style): a group of random spatial
  tiles plus every spot within ``halo`` hops of them, as one induced subgraph; with a halo as
  deep as the network (2 encoder layers + the decoder layer) the loss of the group's own spots
  is exactly what the full graph gives them;
- neighbour-sampled blocks (:func:`neighbor_sampler`, DGL's sampler made repeatable) and
  :func:`full_block` for layer-wise inference.

Everything here draws from the global torch/DGL generators (seeded per epoch by the trainer) or
from an explicit ``torch.Generator``; nothing keeps state between epochs.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .errors import InputError


@contextlib.contextmanager
def _one_thread():
    """DGL's CPU neighbour sampling draws per OpenMP thread, so with several threads the
    same seed gives different samples; one thread makes it reproducible (and costs little)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def neighbor_sampler(fanouts):
    """A ``dgl.dataloading.NeighborSampler`` whose draws follow ``dgl.seed`` exactly."""
    import dgl

    class _Sampler(dgl.dataloading.NeighborSampler):
        def sample_blocks(self, g, seed_nodes, exclude_eids=None):
            with _one_thread():
                return super().sample_blocks(g, seed_nodes, exclude_eids)

    return _Sampler(list(fanouts))


def full_block(graph, dst: torch.Tensor):
    """The block of all in-edges of the nodes ``dst``, built in a fixed order.

    DGL's full-neighbour sampler orders a block's edges differently from call to call, which
    changes float sums; here edges are sorted by (dst, src) and source nodes listed as ``dst``
    first, then new sources in ascending id, so inference is bit-for-bit repeatable.
    """
    import dgl

    src, dst_e = graph.in_edges(dst)
    extra = torch.unique(src)
    extra = extra[~torch.isin(extra, dst)]
    src_nodes = torch.cat([dst, extra])
    local = torch.full((graph.num_nodes(),), -1, dtype=torch.int64)
    local[src_nodes] = torch.arange(src_nodes.numel())
    s_loc, d_loc = local[src], local[dst_e]
    order = torch.argsort(d_loc * src_nodes.numel() + s_loc)
    block = dgl.create_block((s_loc[order], d_loc[order]), num_src_nodes=src_nodes.numel(),
                             num_dst_nodes=dst.numel())
    block.srcdata[dgl.NID] = src_nodes
    block.dstdata[dgl.NID] = dst
    return block



# ---------------------------------------------------------------------------- edge masks, negatives
def _check_undirected(src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
    """Edge masking hides undirected pairs: every edge needs its reverse, and none may repeat."""
    ids = src.long() * n + dst.long()
    unique = torch.unique(ids)
    if unique.numel() < ids.numel():
        raise InputError(f"the training graph has {ids.numel() - unique.numel()} duplicated "
                         "edges; build it with build_graph() or to_dgl(), which remove them")
    reverse = dst.long() * n + src.long()
    found = torch.searchsorted(unique, reverse).clamp_(max=unique.numel() - 1)
    missing = int((unique[found] != reverse).sum())
    if missing:
        raise InputError(f"the training graph is not symmetric: {missing} of its {ids.numel()} "
                         "edges have no reverse; build it with build_graph() or to_dgl(), "
                         "which make it undirected")


class EdgeMasker:
    """Draws the edges to hide from the encoder each step and the kept graph.

    ``"undirected"``: a share of the undirected non-self pairs is dropped in both directions.
    ``"reference"``: each directed edge (self-loops too) is dropped on its own and the kept
    edges are made bidirected again, as in the reference code (most drops stay visible).
    """

    def __init__(self, graph, mode: str, rate: float):
        src, dst = graph.edges()
        self.n = graph.num_nodes()
        _check_undirected(src, dst, self.n)
        self.mode, self.rate = mode, rate
        self.src, self.dst = src, dst
        self.device = src.device
        forward = src < dst
        self.pair_u, self.pair_v = src[forward], dst[forward]
        if mode == "undirected":
            self.fwd_eid = torch.nonzero(forward).squeeze(1)
            self.bwd_eid = graph.edge_ids(self.pair_v, self.pair_u)
        self.self_loops = torch.arange(self.n, device=self.device)

    def draw(self):
        """Return ``(kept_graph, positives)``: positives is a (2, m) tensor of hidden pairs."""
        import dgl

        if self.mode == "undirected":
            n_pairs = self.pair_u.numel()
            chosen = torch.randperm(n_pairs, device=self.device)[: int(round(self.rate * n_pairs))]
            keep = torch.ones(self.src.numel(), dtype=torch.bool, device=self.device)
            keep[self.fwd_eid[chosen]] = False
            keep[self.bwd_eid[chosen]] = False
            kept = dgl.graph((self.src[keep], self.dst[keep]), num_nodes=self.n)
            return kept, torch.stack([self.pair_u[chosen], self.pair_v[chosen]])
        drop = torch.rand(self.src.numel(), device=self.device) < self.rate
        ks, kd = self.src[~drop], self.dst[~drop]
        ids = torch.cat([ks * self.n + kd, kd * self.n + ks,
                         self.self_loops * self.n + self.self_loops])
        ids = torch.unique(ids)
        kept = dgl.graph((ids // self.n, ids % self.n), num_nodes=self.n)
        return kept, torch.stack([self.src[drop], self.dst[drop]])


class NegativeSampler:
    """Pairs (u, v) with v drawn uniformly from u's own slice, never an edge nor u itself.

    ``candidates`` (node ids) restricts v to those nodes (a subgraph step draws its negatives
    among its own core spots); by default every node of the graph is a candidate.
    """

    def __init__(self, graph, slice_codes: torch.Tensor, n_tries: int = 3,
                 candidates: torch.Tensor | None = None):
        self.graph = graph
        codes = slice_codes.long()
        pool = torch.arange(codes.numel(), device=codes.device) if candidates is None \
            else candidates.long()
        order = pool[torch.argsort(codes[pool], stable=True)]
        counts = torch.bincount(codes[pool], minlength=int(codes.max()) + 1 if codes.numel() else 0)
        self.order = order
        self.start = torch.cumsum(counts, 0) - counts
        self.count = counts
        self.codes = codes
        self.n_tries = n_tries

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Negative pairs for sources ``u``: a (2, m') tensor, m' <= len(u)."""
        s = self.codes[u]
        v = torch.empty_like(u)
        todo = torch.ones_like(u, dtype=torch.bool)
        for _ in range(self.n_tries):
            idx = torch.nonzero(todo).squeeze(1)
            if idx.numel() == 0:
                break
            off = (torch.rand(idx.numel(), device=u.device) * self.count[s[idx]]).long()
            v[idx] = self.order[self.start[s[idx]] + off]
            bad = (v[idx] == u[idx]) | self.graph.has_edges_between(u[idx], v[idx])
            todo[idx] = bad
        ok = ~todo
        return torch.stack([u[ok], v[ok]])


def rows_of(pos: torch.Tensor, ptr: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """Columns of ``pos`` (sorted by source) whose source is in ``seeds``."""
    ends = ptr[seeds]
    starts = torch.cat([torch.zeros(1, dtype=ptr.dtype), ptr])[seeds]
    lens = ends - starts
    if lens.sum() == 0:
        return pos[:, :0]
    idx = torch.repeat_interleave(starts, lens) + (
        torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens))
    return pos[:, idx]




# ---------------------------------------------------------------------------- tile subgraphs
class TileSubgraphs:
    """Training subgraphs made of random groups of spatial tiles, each with a k-hop halo.

    ``tiles`` gives every node its tile (spatial tiles of each slice, see
    :func:`spamask_integrate.graph.spatial_tiles`). An epoch shuffles the tiles and cuts them
    into groups of about ``group_size`` spots (the *core* of a step). A step's subgraph is the
    graph induced on the core and every node within ``halo`` hops of it: with ``halo`` equal to
    the network's depth each core spot sees its whole receptive field, so its encoder output,
    reconstruction and edge scores equal the full graph's (node norms use full-graph degrees);
    halo spots only feed the core and carry no loss. Spatial graphs are near-planar, so the halo
    of a compact tile grows with its perimeter, not its area.
    """

    def __init__(self, graph, tiles: np.ndarray | torch.Tensor, group_size: int, halo: int):
        if group_size < 1 or halo < 0:
            raise ValueError("group_size must be >= 1 and halo >= 0")
        self.graph = graph
        self.n = graph.num_nodes()
        tiles = torch.as_tensor(np.asarray(tiles), dtype=torch.int64)
        if tiles.numel() != self.n:
            raise InputError(f"{tiles.numel()} tile ids for a graph of {self.n} nodes")
        _, tiles = torch.unique(tiles, return_inverse=True)
        self.n_tiles = int(tiles.max()) + 1 if self.n else 0
        order = torch.argsort(tiles, stable=True)
        self.tile_sizes = torch.bincount(tiles, minlength=self.n_tiles)
        self.tile_start = torch.cumsum(self.tile_sizes, 0) - self.tile_sizes
        self.tile_nodes = order  # nodes of tile t: tile_nodes[start[t] : start[t] + size[t]]
        self.group_size, self.halo = int(group_size), int(halo)

    def groups(self, generator: torch.Generator, multiple_of: int = 1) -> list[torch.Tensor]:
        """This epoch's cores (sorted node ids): the tiles in a random order, cut into
        ``ceil(n / group_size)`` runs of about equal spot counts (rounded up to a multiple of
        ``multiple_of``, so data-parallel ranks get equal shares)."""
        perm = torch.randperm(self.n_tiles, generator=generator)
        sizes = self.tile_sizes[perm]
        n_groups = -(-self.n // self.group_size)
        n_groups = min(-(-n_groups // multiple_of) * multiple_of, self.n_tiles)
        run = (torch.cumsum(sizes, 0) - sizes) * n_groups // max(self.n, 1)
        starts = self.tile_start[perm]
        out = []
        for r in torch.unique(run):
            chosen = run == r
            lens = sizes[chosen]
            offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(
                torch.cumsum(lens, 0) - lens, lens)
            idx = torch.repeat_interleave(starts[chosen], lens) + offsets
            out.append(torch.sort(self.tile_nodes[idx]).values)
        return out

    def nodes_around(self, core: torch.Tensor) -> torch.Tensor:
        """Sorted ids of ``core`` and every node within ``halo`` in-hops of it."""
        seen = torch.zeros(self.n, dtype=torch.bool)
        seen[core] = True
        frontier = core
        for _ in range(self.halo):
            src, _ = self.graph.in_edges(frontier)
            src = torch.unique(src)
            frontier = src[~seen[src]]
            if frontier.numel() == 0:
                break
            seen[frontier] = True
        return torch.nonzero(seen).squeeze(1)

    def subgraph(self, core: torch.Tensor, kept=None):
        """The induced subgraph around ``core``: ``(sub, kept_sub, nid, is_core)``.

        ``nid`` are the subgraph's node ids in the full graph (sorted), ``is_core`` flags the
        core among them; ``kept_sub`` is ``kept`` (the epoch's edge-masked graph, same nodes)
        induced on the same nodes, or ``None``.
        """
        import dgl

        nid = self.nodes_around(core)
        sub = dgl.node_subgraph(self.graph, nid, store_ids=False)
        kept_sub = None if kept is None else dgl.node_subgraph(kept, nid, store_ids=False)
        is_core = torch.zeros(nid.numel(), dtype=torch.bool)
        is_core[torch.searchsorted(nid, core)] = True
        return sub, kept_sub, nid, is_core
