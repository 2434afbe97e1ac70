"""Data-parallel minibatch training with ``torch.distributed`` (DDP), launched by ``torchrun``.

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
from pathlib import Path

import anndata as ad
import torch

from .config import Keys, SpamaskConfig
from .errors import ResourceError


def worker(input_path: str, output_path: str, config: SpamaskConfig, *,
           batch_key: str = Keys.BATCH, checkpoint: str | None = None,
           checkpoint_every: int = 0, resume: bool = False,
           seed_log_path: str | None = None) -> None:
    """Train on this rank; called once per process under ``torchrun``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from .graph import to_dgl
    from .train import SpaMask, Trainer, _features, seed_all, training_tiles

    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    try:
        adata = ad.read_h5ad(input_path)
        input_key = adata.uns[Keys.UNS]["preprocess"]["input_key"]
        x = _features(adata, input_key)
        graph = to_dgl(adata, batch_key)
        tiles = training_tiles(adata, config, batch_key)
        seed_all(config.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
        model = SpaMask(config.replace(quiet=config.quiet or rank != 0), x.shape[1], input_key)
        trainer = Trainer(model, graph, x, device, minibatch=True, rank=rank, world_size=world,
                          tiles=tiles)
        trainer.net = DistributedDataParallel(
            trainer.module, device_ids=[local] if use_cuda else None)
        if seed_log_path:
            trainer.seed_log = []
        if resume and checkpoint:
            trainer.load_checkpoint(checkpoint)
        trainer.fit(checkpoint, checkpoint_every)
        if seed_log_path:
            torch.save(trainer.seed_log, f"{seed_log_path}.rank{rank}")
            torch.save({k: v.detach() for k, v in trainer.module.named_parameters()},
                       f"{seed_log_path}.params{rank}")
        if rank == 0:
            model.save(output_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    """Command-line entry of a worker (see the module docstring)."""
    parser = argparse.ArgumentParser(description="spamask-integrate data-parallel worker")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-key", default=Keys.BATCH)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--seed-log", default=None)
    args = parser.parse_args(argv)
    config = SpamaskConfig.from_dict(json.loads(Path(args.config).read_text()))
    worker(args.input, args.output, config, batch_key=args.batch_key,
           checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
           resume=args.resume, seed_log_path=args.seed_log)


if __name__ == "__main__":
    main()
