"""Data-parallel training with ``torch.distributed`` (DDP), launched by ``torchrun``.

Two modes. Replicated (``run --nproc N``): one process reads and preprocesses everything and
every rank trains minibatches on the whole graph (below). Slice-sharded (``run --nproc N
--shard-slices``, :func:`shard_worker`): each rank reads, preprocesses, trains on and embeds
only its own slices (see :mod:`spamask_integrate.shard`), so no process holds the atlas.

Replicated mode:

Every rank holds the graph and the features; DGL's ``DataLoader(use_ddp=True)`` gives each rank
a disjoint share of the epoch's seed nodes; gradients are averaged by
``DistributedDataParallel``; masks and sampling are re-seeded every epoch from
(seed, rank, epoch). Rank 0 alone logs progress and writes checkpoints and the model;
inference runs once, in the launching process. Backend: ``nccl`` on GPUs, ``gloo`` on CPU.

Worker entry point (what ``spamask-integrate run --nproc N`` starts through torchrun)::

    torchrun --nproc_per_node 2 -m spamask_integrate.distributed \\
        --input prepared.h5ad --output model.pt --config config.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import torch

from .config import Keys, SpamaskConfig
from .errors import ConfigError, ResourceError
from .utils import release_freed_memory

if TYPE_CHECKING:
    from .train import SpaMask


def _init_rank(config: SpamaskConfig) -> tuple[int, int, int, torch.device]:
    """Join the process group (NCCL with GPUs, else gloo): (rank, world size, local rank,
    device)."""
    import torch.distributed as dist

    config.require_one_model("data-parallel or sharded training")
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), local, device


def _ddp_trainer(config: SpamaskConfig, graph, x, input_key: str, device: torch.device,
                 local: int, *, checkpoint: str | None = None, seed_log: bool = False,
                 **trainer_kwargs):
    """The same initial model on every rank, its Trainer with DDP's gradient averaging, and
    the state of ``checkpoint`` when resuming: ``(model, trainer)``."""
    from torch.nn.parallel import DistributedDataParallel

    from .train import SpaMask, Trainer, seed_all

    seed_all(config.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    quiet = config.quiet or trainer_kwargs.get("rank", 0) != 0
    model = SpaMask(config.replace(quiet=quiet), x.shape[1], input_key)
    trainer = Trainer(model, graph, x, device, **trainer_kwargs)
    trainer.net = DistributedDataParallel(
        trainer.module, device_ids=[local] if device.type == "cuda" else None)
    if seed_log:
        trainer.seed_log = []
    if checkpoint:
        trainer.load_checkpoint(checkpoint)
    return model, trainer


def worker(input_path: str, output_path: str, config: SpamaskConfig, *,
           batch_key: str = Keys.BATCH, checkpoint: str | None = None,
           checkpoint_every: int = 0, resume: bool = False,
           seed_log_path: str | None = None) -> None:
    """Train on this rank; called once per process under ``torchrun``."""
    import torch.distributed as dist

    from .graph import to_dgl
    from .train import _features, training_tiles

    rank, world, local, device = _init_rank(config)
    try:
        adata = ad.read_h5ad(input_path)
        input_key = adata.uns[Keys.UNS]["preprocess"]["input_key"]
        x = _features(adata, input_key)
        graph = to_dgl(adata, batch_key)
        model, trainer = _ddp_trainer(config, graph, x, input_key, device, local,
                                      checkpoint=checkpoint if resume else None,
                                      minibatch=True, rank=rank, world_size=world,
                                      tiles=training_tiles(adata, config, batch_key),
                                      seed_log=bool(seed_log_path))
        trainer.fit(checkpoint, checkpoint_every)
        trainer.hand_over()
        if seed_log_path:
            torch.save(trainer.seed_log, f"{seed_log_path}.rank{rank}")
            torch.save({k: v.detach() for k, v in trainer.module.named_parameters()},
                       f"{seed_log_path}.params{rank}")
        if rank == 0:
            model.save(output_path)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise


def train_distributed(adata: ad.AnnData, batch_key: str, config: SpamaskConfig, *, nproc: int,
                      nnodes: int = 1, node_rank: int = 0, master_addr: str = "127.0.0.1",
                      master_port: int | None = None, checkpoint: str | Path | None = None,
                      checkpoint_every: int = 0, resume: bool = False,
                      workdir: str | Path | None = None, seed_log_path: str | None = None):
    """Train with ``nproc`` processes on this node (``nnodes`` nodes in all) and return the
    model trained by rank 0 (``None`` on nodes other than 0, which hold no model file).

    ``adata`` must be preprocessed and hold its graph in ``obsp``; it is written once to a
    temporary h5ad that every worker reads.
    """
    from .train import SpaMask

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        prepared, model_path = Path(tmp) / "prepared.h5ad", Path(tmp) / "model.pt"
        slim = ad.AnnData(obs=adata.obs[[batch_key]].copy(), obsm=dict(adata.obsm),
                          obsp=dict(adata.obsp), uns={Keys.UNS: dict(adata.uns[Keys.UNS])})
        slim.write_h5ad(prepared)
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(config.to_dict()))
        port = master_port or _free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
               f"--master_port={port}", "-m", "spamask_integrate.distributed",
               "--input", str(prepared), "--output", str(model_path), "--config", str(cfg_path),
               "--batch-key", batch_key]
        if checkpoint:
            cmd += ["--checkpoint", str(checkpoint), "--checkpoint-every", str(checkpoint_every)]
        if resume:
            cmd += ["--resume"]
        if seed_log_path:
            cmd += ["--seed-log", seed_log_path]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
        result = subprocess.run(cmd, env=env, check=False)
        if result.returncode != 0:
            raise ResourceError(f"distributed training failed (torchrun exit {result.returncode})")
        return SpaMask.load(model_path) if model_path.exists() else None


# ---------------------------------------------------------------------------- sharded runs
#: width of the gathered embeddings of a sharded run (the PCA Harmony and the caller use)
SHARD_PCS = 30


def shard_worker(spec: dict, output_path: str, config: SpamaskConfig) -> None:
    """One rank of a slice-sharded run: read, preprocess, build the graph, train and embed only
    this rank's slices; rank 0 gathers every rank's (n x 30) result and writes it.

    ``spec`` holds the plan (``plan_shards``, as ``[path, name, ..., n_spots, rank]`` rows), the
    read, preprocess and graph parameters, checkpointing and where to put the model.
    """
    import torch.distributed as dist

    from .errors import SpamaskError
    from .graph import build_graph
    from .preprocess import preprocess
    from .shard import Collective, read_shard
    from .train import _features, embed_and_record, training_tiles

    rank, world, local, device = _init_rank(config)
    comm = Collective()
    stages: dict[str, dict[str, float]] = {}
    clock = [time.perf_counter()]

    def mark(stage: str) -> None:  # seconds of the stage and the peak RSS so far
        release_freed_memory()
        now = time.perf_counter()
        stages[stage] = {"seconds": round(now - clock[0], 3), "peak_rss_gb": _peak_rss_gb()}
        clock[0] = now

    batch_key, label_key = spec["batch_key"], spec["label_key"]
    try:
        plan = _plan_from_rows(spec["plan"])
        adata = read_shard(plan, rank, comm, batch_key=batch_key, label_key=label_key,
                           min_spots=spec["min_spots"])
        mark("read")
        preprocess(adata, batch_key=batch_key, seed=config.seed, comm=comm,
                   **spec["preprocess"])
        # the gathered result holds no counts (they stay in the input files): from here on a
        # rank needs only the model input, the coordinates and obs
        adata.X = None
        adata.layers.clear()
        mark("preprocess")
        graph = build_graph(adata, batch_key, **spec["graph"])
        mark("graph")
        n_total = int(comm.sum([adata.n_obs])[0])
        minibatch = config.minibatch if config.minibatch is not None \
            else n_total > config.minibatch_threshold
        input_key = adata.uns[Keys.UNS]["preprocess"]["input_key"]
        x = _features(adata, input_key)
        tiles = training_tiles(adata, config, batch_key) if minibatch else None
        checkpoint = spec.get("checkpoint")
        model, trainer = _ddp_trainer(config, graph, x, input_key, device, local,
                                      checkpoint=checkpoint if spec.get("resume") else None,
                                      minibatch=bool(minibatch), rank=rank, world_size=world,
                                      tiles=tiles, sharded=True, n_total=n_total)
        tic = time.perf_counter()
        trainer.fit(checkpoint, spec.get("checkpoint_every", 0))
        trainer.hand_over()
        mark("train")
        embed_and_record(adata, model, graph, batch_key=batch_key, key_added=Keys.EMB,
                         mode=f"{'subgraph' if minibatch else 'full-graph'}-sharded",
                         device=device, train_seconds=time.perf_counter() - tic,
                         processes=world, epochs=trainer.epochs)
        emb = _shared_pca(adata.obsm[Keys.EMB], comm, SHARD_PCS)
        mark("embed")
        parts = comm.gather(_shard_payload(adata, emb, stages, rank == 0))
        if rank == 0:
            _write_gathered(parts, plan, output_path, batch_key)
            model.save(spec["model_path"])
        dist.barrier()
    except BaseException as exc:
        if isinstance(exc, SpamaskError):  # the launcher re-raises the first rank's message
            Path(f"{spec['error_path']}.rank{rank}").write_text(
                f"{exc.__class__.__name__}\t{exc}")
        dist.destroy_process_group()
        raise


def _peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def _plan_from_rows(rows: list[dict]):
    from .io import SliceSource
    from .shard import PlannedSlice

    return [PlannedSlice(SliceSource(Path(r["path"]), r["name"],
                                     Path(r["coordinates"]) if r["coordinates"] else None,
                                     r["platform"], r["label_key"], r["slice_column"]),
                         int(r["n_spots"]), int(r["rank"])) for r in rows]


def _plan_rows(plan) -> list[dict]:
    return [{"path": str(p.source.path), "name": p.source.name,
             "coordinates": str(p.source.coordinates) if p.source.coordinates else None,
             "platform": p.source.platform, "label_key": p.source.label_key,
             "slice_column": p.source.slice_column, "n_spots": p.n_spots, "rank": p.rank}
            for p in plan]


def _shared_pca(x, comm, n_pcs: int, block: int = 65_536):
    """PCA of the rows of all ranks (exact, through the summed Gram matrix of the centred
    columns); each rank gets the scores of its own rows, float32. Rows are centred in float64
    a block of ``block`` rows at a time, so the memory beyond ``x`` is a few blocks."""
    import numpy as np
    import scipy.linalg

    d = x.shape[1]
    if d <= n_pcs:
        return np.asarray(x, dtype=np.float32)
    n = comm.sum([x.shape[0]])[0]
    mean = comm.sum(np.asarray(x).sum(axis=0, dtype=np.float64)) / max(n, 1)

    def centred():  # (start row, centred float64 block)
        for lo in range(0, x.shape[0], block):
            yield lo, np.asarray(x[lo:lo + block], dtype=np.float64) - mean

    gram = comm.sum(sum((c.T @ c for _, c in centred()), np.zeros((d, d))))
    values, vectors = scipy.linalg.eigh(gram, subset_by_index=[d - n_pcs, d - 1])
    vectors = comm.broadcast(vectors[:, ::-1].copy())
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(n_pcs)])
    signs[signs == 0] = 1
    vectors = vectors * signs
    out = np.empty((x.shape[0], n_pcs), dtype=np.float32)
    for lo, c in centred():
        out[lo:lo + len(c)] = c @ vectors
    return out


def _shard_payload(adata, emb, stages, with_var: bool) -> dict:
    import scipy.sparse as sp

    return {"obs": adata.obs, "spatial": np.asarray(adata.obsm[Keys.SPATIAL]),
            "pca": np.ascontiguousarray(adata.obsm[Keys.PCA][:, :SHARD_PCS]), "emb": emb,
            "adj": sp.csr_matrix(adata.obsp[Keys.CONNECTIVITIES]), "stages": stages,
            "var": adata.var if with_var else None, "uns": adata.uns[Keys.UNS],
            "slices": list(adata.uns[Keys.UNS]["read"]["shard_slices"])}


def _write_gathered(parts: list[dict], plan, path: str, batch_key: str) -> None:
    """Every rank's spots in the order a single process would hold them (plan order, then file
    order), with the graph, the 30-d PCA and embedding, and the records of the run."""
    import pandas as pd
    import scipy.sparse as sp

    from .io import atomic_write
    from .utils import h5ad_safe

    obs = pd.concat([p["obs"] for p in parts])
    names = [p.source.name for p in plan]
    obs[batch_key] = pd.Categorical(obs[batch_key].astype(str), categories=names)
    order = np.argsort(obs[batch_key].cat.codes.to_numpy(), kind="stable")
    adj = sp.block_diag([p["adj"] for p in parts], format="csr")[order][:, order]
    first = parts[0]["uns"]
    adata = ad.AnnData(obs=obs.iloc[order].copy(), var=parts[0]["var"])
    adata.obsm[Keys.SPATIAL] = np.concatenate([p["spatial"] for p in parts])[order]
    adata.obsm[Keys.PCA] = np.concatenate([p["pca"] for p in parts])[order]
    adata.obsm[Keys.EMB] = np.concatenate([p["emb"] for p in parts])[order]
    adata.obsp[Keys.CONNECTIVITIES] = adj.tocsr()
    graph = dict(first["graph"])
    for key in ("k", "edges_per_slice"):
        graph[key] = {k: v for p in parts for k, v in p["uns"]["graph"][key].items()}
    graph["n_edges"] = int(adj.nnz)
    read = {k: v for k, v in first["read"].items() if k not in ("shard_rank", "shard_slices")}
    read["sources"] = sorted({str(p.source.path) for p in plan})
    adata.uns[Keys.UNS] = {"read": read, "preprocess": first["preprocess"], "graph": graph,
                           "train": first["train"]}
    adata.uns[Keys.UNS]["shard"] = h5ad_safe({
        "ranks": len(parts), "pcs": SHARD_PCS,
        "slices": {str(r): p["slices"] for r, p in enumerate(parts)},
        "spots": {str(r): int(len(p["obs"])) for r, p in enumerate(parts)},
        "stages": {str(r): p["stages"] for r, p in enumerate(parts)},
    })
    with atomic_write(path) as tmp:
        adata.write_h5ad(tmp)


def run_sharded(sources, config: SpamaskConfig, *, nproc: int, nnodes: int = 1,
                node_rank: int = 0, master_addr: str = "127.0.0.1",
                master_port: int | None = None, batch_key: str = Keys.BATCH,
                label_key: str | None = None, slice_column: str | None = None,
                min_spots: int = 7, preprocess_kwargs: dict | None = None,
                graph_kwargs: dict | None = None, checkpoint: str | Path | None = None,
                checkpoint_every: int = 0, resume: bool = False,
                workdir: str | Path | None = None) -> tuple[ad.AnnData | None, SpaMask | None]:
    """Plan the shards, run ``nproc`` x ``nnodes`` ranks of :func:`shard_worker` through
    torchrun, and return (on node 0) the gathered AnnData and the trained model.

    This process reads only the sources' ``obs`` (for the plan); the ranks read the counts.
    """
    from .errors import InputError
    from .shard import plan_shards
    from .train import SpaMask

    world = nproc * nnodes
    plan = plan_shards(sources, world, slice_column=slice_column)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        spec = {"plan": _plan_rows(plan), "batch_key": batch_key, "label_key": label_key,
                "min_spots": min_spots, "preprocess": preprocess_kwargs or {},
                "graph": graph_kwargs or {}, "checkpoint": str(checkpoint) if checkpoint else None,
                "checkpoint_every": checkpoint_every, "resume": resume,
                "model_path": str(tmp / "model.pt"), "error_path": str(tmp / "error")}
        (tmp / "spec.json").write_text(json.dumps(spec))
        (tmp / "config.json").write_text(json.dumps(config.to_dict()))
        gathered = tmp / "gathered.h5ad"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
               f"--master_port={master_port or _free_port()}", "-m",
               "spamask_integrate.distributed", "--shard-spec", str(tmp / "spec.json"),
               "--output", str(gathered), "--config", str(tmp / "config.json")]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
        result = subprocess.run(cmd, env=env, check=False)
        errors = sorted(tmp.glob("error.rank*"), key=lambda p: int(p.suffix[5:]))
        if errors:
            kind, _, message = errors[0].read_text().partition("\t")
            error = {"InputError": InputError, "ConfigError": ConfigError}.get(kind, ResourceError)
            raise error(f"{message} (rank {errors[0].suffix[5:]} of the sharded run)")
        if result.returncode != 0:
            raise ResourceError(f"sharded run failed (torchrun exit {result.returncode}): a rank "
                                "died; its traceback is above"
                                + ("; continue with --resume" if checkpoint else ""))
        if not gathered.exists():
            return None, None
        return ad.read_h5ad(gathered), SpaMask.load(tmp / "model.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    """Command-line entry of a worker (see the module docstring)."""
    parser = argparse.ArgumentParser(description="spamask-integrate data-parallel worker")
    parser.add_argument("--input", default=None)
    parser.add_argument("--shard-spec", default=None)
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-key", default=Keys.BATCH)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed-log", default=None)
    args = parser.parse_args(argv)
    config = SpamaskConfig.from_dict(json.loads(Path(args.config).read_text()))
    if args.shard_spec:
        shard_worker(json.loads(Path(args.shard_spec).read_text()), args.output, config)
    else:
        worker(args.input, args.output, config, batch_key=args.batch_key,
               checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
               resume=args.resume, seed_log_path=args.seed_log)
    # Done: every result is written and all ranks passed the final barrier. Leave without
    # running destructors: with torch 2.2.1, gloo's process-group destructor sometimes waited
    # forever on a lock once the other rank had exited (2 of about 10 sharded runs in one
    # session hung there, in destroy_process_group or when DDP's reducer was freed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
