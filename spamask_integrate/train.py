"""Training and inference of SpaMask: full-graph or neighbour-sampled minibatches, seeded.

Every epoch re-seeds torch, numpy and DGL from ``(seed, rank, epoch)``, so an epoch can be
replayed on its own (checkpoint resume, data-parallel ranks). Masked nodes, dropped edges and
negative pairs are drawn here and handed to the pure modules of :mod:`spamask_integrate.model`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import torch

from .config import Keys, SpamaskConfig
from .errors import ConfigError, InputError, ResourceError
from .model import SpaMaskModule
from .sampling import (EdgeMasker, NegativeSampler, TileSubgraphs, full_block,
                       neighbor_sampler, rows_of)
from .utils import record, require_obsm

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- seeding, device
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 31-bit seed derived from (seed, rank, epoch) (DGL takes a signed int); rank -1 gives
    the draws every rank must share."""
    return int(np.random.SeedSequence([int(seed), int(rank) + 1, int(epoch)])
               .generate_state(1)[0] >> 1)


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch and DGL's samplers (the one global seeding point)."""
    import dgl

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    dgl.seed(seed)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a CUDA request without CUDA raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ResourceError(f"device={device!r} but CUDA is not available; use device='cpu'")
    return torch.device(device)


@contextlib.contextmanager
def _quiet_dgl_loader():
    """Hide DGL's per-iteration advice about CPU affinity (it is not actionable here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CPU affinity.*")
        yield


# ---------------------------------------------------------------------------- graph helpers
def gcn_norms(graph, deg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric GCN normalisation 1/sqrt(d_src d_dst) as (source, destination) node scales.

    ``deg`` is the full graph's in-degree; for a sampled block it is indexed by ``dgl.NID`` and
    each destination is rescaled by (full degree / sampled in-degree), an unbiased estimate of
    the full neighbourhood sum that is exact when the fan-out cut nothing (as in inference).
    """
    import dgl

    if graph.is_block:
        d_src = deg[graph.srcdata[dgl.NID]].float()
        d_dst = deg[graph.dstdata[dgl.NID]].float()
        return d_src.rsqrt(), d_dst.rsqrt() * d_dst / graph.in_degrees().float().clamp(min=1)
    d = (graph.in_degrees() if deg is None else deg).float().clamp(min=1).rsqrt()
    return d, d


def training_epochs(config: SpamaskConfig, n_obs: int, minibatch: bool) -> int:
    """Epochs a run trains for: ``config.epochs``, or with ``"auto"`` a budget of spot visits.

    ``"auto"``: full-graph training runs ``full_graph_epochs`` (100) epochs while the graph
    fits one step (``subgraph_size`` spots, as the four DLPFC slices do). Minibatch training
    gets ``budget_steps`` (150) steps' worth of ``subgraph_size`` spots, i.e.
    ``ceil(budget_steps x subgraph_size / n_obs)`` epochs: 25 at 100,000 spots, 3 at 10^6, so
    training time stops growing with the data. A full graph larger than one step gets
    ``full_graph_epochs`` x ``subgraph_size`` spot visits. The convergence study behind the
    numbers is in benchmarks/README.md ("Training budget").
    """
    if config.epochs != "auto":
        return int(config.epochs)
    steps = config.budget_steps if minibatch else config.full_graph_epochs
    visits = steps * min(n_obs, config.subgraph_size)
    return max(1, -(-visits // max(n_obs, 1)))


# ---------------------------------------------------------------------------- model object
@dataclass
class SpaMask:
    """A trained (or untrained) SpaMask model: the module, its config and its history."""

    config: SpamaskConfig
    in_dim: int
    input_key: str = Keys.PCA
    history: dict[str, list[float]] = field(default_factory=lambda: {
        "loss": [], "sce": [], "edge": [], "seconds": []})
    module: SpaMaskModule | None = None

    def __post_init__(self):
        if self.module is None:
            c = self.config
            self.module = SpaMaskModule(
                self.in_dim, c.hidden_dim, c.latent_dim, batch_norm=c.batch_norm,
                edge_decoder_hidden=c.edge_decoder_hidden,
                edge_decoder_dropout=c.edge_decoder_dropout, mask_mode=c.mask_mode)

    def embed(self, adata: ad.AnnData, graph=None, *, batch_key: str = Keys.BATCH,
              use_rep: str | None = None, key_added: str = Keys.EMB,
              device: str | None = None) -> np.ndarray:
        """Embed every spot of ``adata`` with the encoder on its full, unmasked graph.

        ``obsm[use_rep]`` (default: the key the model was trained on) must be in the same
        feature space as the training input. Writes ``obsm[key_added]`` and returns it.
        """
        use_rep = use_rep or self.input_key
        x = _features(adata, use_rep)
        if x.shape[1] != self.in_dim:
            raise InputError(f"obsm[{use_rep!r}] has {x.shape[1]} columns; the model was "
                             f"trained on {self.in_dim}")
        graph = _graph_for(adata, graph, batch_key)
        dev = resolve_device(device or self.config.device)
        emb = inference(self.module, graph, x, dev, self.config.inference_batch_size)
        adata.obsm[key_added] = emb
        return emb

    def payload(self) -> dict[str, Any]:
        """State dict, config and history: what :meth:`save` writes."""
        return {"state_dict": self.module.state_dict(), "config": self.config.to_dict(),
                "in_dim": self.in_dim, "input_key": self.input_key,
                "history": self.history, "format": 1}

    def save(self, path: str | Path) -> None:
        """Write state dict, config and history to ``path`` atomically."""
        _save(self.payload(), path)

    @classmethod
    def load(cls, path: str | Path) -> SpaMask:
        """Load a model written by :meth:`save` (on CPU; ``embed`` moves it as configured)."""
        payload = _load(path)
        if "members" in payload:
            raise InputError(f"{path}: holds {len(payload['members'])} models (n_models > 1); "
                             "load it with SpaMaskEnsemble.load")
        return cls.from_payload(payload, path)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], path: str | Path = "the payload") -> SpaMask:
        """The model of a :meth:`payload` dict."""
        try:
            model = cls(SpamaskConfig.from_dict(payload["config"]), int(payload["in_dim"]),
                        payload["input_key"], payload.get("history", {}))
            model.module.load_state_dict(payload["state_dict"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise InputError(f"{path}: not a spamask-integrate model ({exc})") from exc
        return model


def _save(payload: dict[str, Any], path: str | Path) -> None:
    from .io import atomic_write

    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def _load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu")
    except (RuntimeError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: not a spamask-integrate model ({exc})") from exc
    if not isinstance(payload, dict):
        raise InputError(f"{path}: not a spamask-integrate model")
    return payload


def member_seeds(seed: int, n_models: int) -> list[int]:
    """Training seeds of ``n_models`` models: ``seed`` itself, then seeds drawn from it (so
    the first model of several is the model that ``n_models=1`` trains)."""
    return [int(seed)] + [int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]
                                 % 2**31) for i in range(1, n_models)]


@dataclass
class SpaMaskEnsemble:
    """Several SpaMask models trained on the same data with different seeds
    (``n_models > 1``); their embedding is the members' embeddings side by side."""

    config: SpamaskConfig
    members: list[SpaMask]

    @property
    def input_key(self) -> str:
        return self.members[0].input_key

    def embed(self, adata: ad.AnnData, graph=None, *, batch_key: str = Keys.BATCH,
              use_rep: str | None = None, key_added: str = Keys.EMB,
              device: str | None = None) -> np.ndarray:
        """Embed every spot with each member (:meth:`SpaMask.embed`); writes the members'
        embeddings side by side to ``obsm[key_added]`` and returns them."""
        graph = _graph_for(adata, graph, batch_key)
        parts = [m.embed(adata, graph, batch_key=batch_key, use_rep=use_rep,
                         key_added=key_added, device=device) for m in self.members]
        adata.obsm[key_added] = emb = np.hstack(parts)
        return emb

    def save(self, path: str | Path) -> None:
        """Write every member (state dict, config, history) to ``path`` atomically."""
        _save({"format": 1, "config": self.config.to_dict(),
               "members": [m.payload() for m in self.members]}, path)

    @classmethod
    def load(cls, path: str | Path) -> SpaMaskEnsemble:
        """Load models written by :meth:`save`."""
        payload = _load(path)
        if "members" not in payload:
            raise InputError(f"{path}: holds one model; load it with SpaMask.load")
        try:
            config = SpamaskConfig.from_dict(payload["config"])
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: not a spamask-integrate model ({exc})") from exc
        return cls(config, [SpaMask.from_payload(p, path) for p in payload["members"]])


# ---------------------------------------------------------------------------- public API
def train(adata: ad.AnnData, graph=None, batch_key: str = Keys.BATCH,
          config: SpamaskConfig | None = None, *, use_rep: str | None = None,
          key_added: str = Keys.EMB, checkpoint: str | Path | None = None,
          checkpoint_every: int = 0, resume: bool = False, **overrides: Any
          ) -> SpaMask | SpaMaskEnsemble:
    """Train SpaMask on ``adata`` and write the embedding.

    Parameters
    ----------
    graph
        The spatial graph; ``None`` rebuilds it from ``obsp`` or builds the default one.
    config
        A :class:`SpamaskConfig`; keyword ``overrides`` (``epochs``, ``minibatch``, ``seed``,
        ``device``, ...) replace single fields.
    use_rep
        Model input; default the key ``preprocess`` recorded (``"X_pca"``).
    checkpoint, checkpoint_every, resume
        Write a checkpoint to ``checkpoint`` every ``checkpoint_every`` epochs; with ``resume``
        continue from it. Epochs re-seed from (seed, epoch), so on CPU a resumed run ends with
        the same embedding as an uninterrupted one.

    Reads ``obsm[use_rep]``, ``obs[batch_key]``. Writes ``obsm[key_added]`` and
    ``uns["spamask"]["train"]`` (config, seed, versions, device, per-epoch losses, timings).

    With ``n_models > 1`` it trains that many models, one after another (the first with
    ``seed``, the others with seeds drawn from it: :func:`member_seeds`), writes their
    embeddings side by side (``n_models * latent_dim`` columns; each member's record under
    ``uns["spamask"]["train"]["members"]``) and returns a :class:`SpaMaskEnsemble`. The
    training takes ``n_models`` times as long; checkpoints are for one model.
    """
    config = (config or SpamaskConfig()).replace(**overrides)
    if config.n_models > 1:
        return _train_ensemble(adata, graph, batch_key, config, use_rep=use_rep,
                               key_added=key_added, checkpoint=checkpoint, resume=resume)
    return _train_one(adata, graph, batch_key, config, use_rep=use_rep, key_added=key_added,
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)


def _train_one(adata: ad.AnnData, graph, batch_key: str, config: SpamaskConfig, *,
               use_rep: str | None, key_added: str, checkpoint=None, checkpoint_every: int = 0,
               resume: bool = False, member: tuple[int, int] = (0, 1)) -> SpaMask:
    """One model, as :func:`train` describes; ``member`` = (index, count) of an ensemble's
    member, for the progress bar."""
    use_rep = use_rep or adata.uns.get(Keys.UNS, {}).get("preprocess", {}).get("input_key",
                                                                                Keys.PCA)
    x = _features(adata, use_rep)
    graph = _graph_for(adata, graph, batch_key)
    device = resolve_device(config.device)
    minibatch = config.minibatch
    if minibatch is None:
        minibatch = adata.n_obs > config.minibatch_threshold
    seed_all(config.seed)  # before the module exists: its initial weights follow the seed
    model = SpaMask(config, x.shape[1], use_rep)
    tiles = training_tiles(adata, config, batch_key) if minibatch else None
    start = time.perf_counter()
    trainer = Trainer(model, graph, x, device, minibatch=bool(minibatch), tiles=tiles)
    if resume:
        if checkpoint is None:
            raise ConfigError("resume=True needs the checkpoint path")
        trainer.load_checkpoint(checkpoint)
    trainer.fit(checkpoint, checkpoint_every, member=member)
    trainer.hand_over()
    train_seconds = time.perf_counter() - start
    embed_and_record(adata, model, graph, batch_key=batch_key, key_added=key_added,
                     mode=training_mode(config, bool(minibatch)), device=device,
                     train_seconds=train_seconds, epochs=trainer.epochs)
    return model


def _train_ensemble(adata: ad.AnnData, graph, batch_key: str, config: SpamaskConfig, *,
                    use_rep: str | None, key_added: str, checkpoint, resume: bool
                    ) -> SpaMaskEnsemble:
    """``config.n_models`` models one after another, each as ``train`` trains one."""
    if checkpoint is not None or resume:
        raise ConfigError(f"n_models={config.n_models}: checkpoints hold one model; train "
                          "several without a checkpoint, or one (n_models=1) with it")
    graph = _graph_for(adata, graph, batch_key)
    members, parts, records = [], [], {}
    seeds = member_seeds(config.seed, config.n_models)
    for i, seed in enumerate(seeds):
        logger.info("train: model %d of %d (seed %d)", i + 1, len(seeds), seed)
        members.append(_train_one(adata, graph, batch_key,
                                  config.replace(n_models=1, seed=seed), use_rep=use_rep,
                                  key_added=key_added, member=(i, len(seeds))))
        parts.append(adata.obsm[key_added])
        records[str(i)] = adata.uns[Keys.UNS]["train"]
    adata.obsm[key_added] = np.hstack(parts)
    first = records["0"]
    record(adata, "train", {
        **{k: first[k] for k in ("device", "mode", "processes", "input_key", "epochs",
                                 "versions")},
        "config": config.to_dict(), "seed": config.seed, "key_added": key_added,
        "n_models": config.n_models, "member_seeds": np.asarray(seeds),
        "train_seconds": sum(float(r["train_seconds"]) for r in records.values()),
        "inference_seconds": sum(float(r["inference_seconds"]) for r in records.values()),
        "members": records,
    })
    return SpaMaskEnsemble(config, members)


def weight_average(module: SpaMaskModule, decay: float):
    """A moving average of ``module``'s weights and batch-norm statistics, updated after every
    optimiser step (``None`` when ``decay`` is 0).

    After t steps it is the mean of the weights of every step so far, step s weighted by
    ``decay ** (t - s)``: an exponential moving average whose weights are normalised to sum to
    one (the bias correction Adam applies to its moments). So the starting weights do not keep
    a share of ``decay ** (t - 1)`` (0.22 after 150 steps at 0.99, 0.75 after 30), as they would
    in an average started from them, and a short budget averages its steps about equally.

    Why: the partition the domain caller finds in an embedding can change from one step to the
    next late in training (at 10^6 tiled spots, seed 2023: ARI 0.573 after 2 epochs, 0.485
    after 3, 0.578 after 5); an average over the last ~100 steps changes slowly.
    """
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel

    def normalised_ema(averaged: torch.Tensor, current: torch.Tensor,
                       n_averaged: torch.Tensor) -> torch.Tensor:
        t = float(n_averaged) + 1  # this update's number (the first one copies)
        return averaged + (current - averaged) * ((1 - decay) / (1 - decay ** t))

    return AveragedModel(module, avg_fn=normalised_ema, use_buffers=True)


def training_mode(config: SpamaskConfig, minibatch: bool) -> str:
    """``"full-graph"``, ``"subgraph"`` (tile groups with a halo) or ``"neighbor"`` sampling."""
    return config.sampler if minibatch else "full-graph"


def training_tiles(adata: ad.AnnData, config: SpamaskConfig, batch_key: str) -> np.ndarray | None:
    """Spatial tile of every spot for minibatch training: ``subgraph_tile_size`` spots per tile
    for subgraph steps, ``tile_size`` for neighbour-sampled seeds (``None`` if that is <= 1)."""
    from .graph import spatial_tiles
    from .utils import batch_codes

    size = config.subgraph_tile_size if config.sampler == "subgraph" else config.tile_size
    if size <= 1 and config.sampler == "neighbor":
        return None
    require_obsm(adata, Keys.SPATIAL)
    return spatial_tiles(np.asarray(adata.obsm[Keys.SPATIAL]), batch_codes(adata, batch_key),
                         max(int(size), 1))


def embed_and_record(adata: ad.AnnData, model: SpaMask, graph, *, batch_key: str,
                     key_added: str, mode: str, device, train_seconds: float,
                     processes: int = 1, epochs: int | None = None) -> None:
    """Embed all spots once and record the training in ``uns["spamask"]["train"]``."""
    tic = time.perf_counter()
    model.embed(adata, graph, batch_key=batch_key, key_added=key_added)
    h = model.history
    record(adata, "train", {
        "config": model.config.to_dict(), "seed": model.config.seed, "device": str(device),
        "mode": mode, "processes": processes, "input_key": model.input_key,
        "key_added": key_added, "epochs": int(epochs if epochs is not None else len(h["loss"])),
        "epochs_run": len(h["loss"]),
        "loss": np.asarray(h["loss"]), "sce": np.asarray(h["sce"]),
        "edge": np.asarray(h["edge"]), "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(len(h["loss"]), 1),
        "inference_seconds": time.perf_counter() - tic, "versions": versions(),
    })


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers, and the CPU kernels torch and numpy
    run (``torch_cpu``: the vector instructions of torch's own CPU kernels, e.g. "AVX512" or
    "AVX2"; the same seed trains another embedding where they differ)."""
    import dgl
    import sklearn

    from . import __version__
    from .utils import numpy_blas

    return {"spamask_integrate": __version__, "torch": str(torch.__version__),
            "torch_cpu": str(torch.backends.cpu.get_cpu_capability()),
            "dgl": str(dgl.__version__),
            "numpy": np.__version__, "numpy_blas": numpy_blas(), "sklearn": sklearn.__version__,
            "python": platform.python_version()}


def _features(adata: ad.AnnData, key: str) -> np.ndarray:
    require_obsm(adata, key, "run preprocess() first")
    x = adata.obsm[key]
    import scipy.sparse as sp

    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"obsm[{key!r}] contains NaN or infinite values")
    return x


def _graph_for(adata: ad.AnnData, graph, batch_key: str):
    from .graph import build_graph, to_dgl

    if graph is None:
        graph = to_dgl(adata, batch_key) if Keys.CONNECTIVITIES in adata.obsp else \
            build_graph(adata, batch_key)
    if graph.num_nodes() != adata.n_obs:
        raise InputError(f"graph has {graph.num_nodes()} nodes but adata has {adata.n_obs} spots")
    if "slice" not in graph.ndata:
        from .utils import batch_codes

        graph.ndata["slice"] = torch.from_numpy(batch_codes(adata, batch_key))
    return graph


# ---------------------------------------------------------------------------- the loops
class Trainer:
    """Runs the epochs of one model: full-graph or neighbour-sampled minibatches."""

    def __init__(self, model: SpaMask, graph, x: np.ndarray, device: torch.device, *,
                 minibatch: bool, rank: int = 0, world_size: int = 1,
                 tiles: np.ndarray | None = None, sharded: bool = False,
                 n_total: int | None = None):
        self.model, self.config = model, model.config
        self.device, self.minibatch, self.rank = device, minibatch, rank
        self.world_size = world_size
        self.module = model.module.to(device)
        self.x = torch.from_numpy(x).to(device if not minibatch else "cpu")
        self.graph = graph.to(device) if not minibatch else graph
        self.deg = self.graph.in_degrees().to(device)  # full-graph degrees, for block norms
        self.norm = gcn_norms(self.graph)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=self.config.lr,
                                          weight_decay=self.config.weight_decay)
        self.masker = EdgeMasker(self.graph, self.config.edge_mask, self.config.edge_drop_rate)
        self.negatives = NegativeSampler(self.graph, self.graph.ndata["slice"])
        self.start_epoch = 0
        # sharded (slice-sharded runs): the graph is this rank's own slices, ``n_total`` the
        # spots of all ranks; the budget follows the whole atlas, as in one process
        self.sharded = sharded
        if sharded and minibatch and self.config.sampler != "subgraph":
            raise ConfigError("a sharded run trains on the full graph or on tile subgraphs, "
                              "not with neighbour sampling; drop --sampler neighbor")
        self.epochs = training_epochs(self.config, n_total or graph.num_nodes(), minibatch)
        self.tiles = None if tiles is None else torch.from_numpy(np.asarray(tiles, np.int64))
        self.subgraphs = None
        if minibatch and self.config.sampler == "subgraph":
            if self.tiles is None:
                raise ConfigError("subgraph training needs the spatial tile of every spot")
            self.subgraphs = TileSubgraphs(self.graph, self.tiles, self.config.subgraph_size,
                                           self.config.halo)
        self.net = self.module  # replaced by a DistributedDataParallel wrapper in workers
        self.average = weight_average(self.module, self.config.ema_decay)
        self.seed_log: list | None = None  # (epoch, seed nodes) of every minibatch, if a list

    def fit(self, checkpoint: str | Path | None = None, checkpoint_every: int = 0, *,
            member: tuple[int, int] = (0, 1)) -> None:
        """Train for ``self.epochs`` epochs (from ``start_epoch``), with progress and stopping.

        With ``checkpoint`` and ``checkpoint_every`` = E, rank 0 writes a checkpoint atomically
        after every E-th epoch (see :meth:`save_checkpoint`). ``member`` = (i, n): this model
        is the i-th (from 0) of n trained one after another; the progress bar then counts the
        epochs of all n, so its ETA is the time left for the whole ensemble.
        """
        from tqdm.auto import tqdm

        c = self.config
        losses = self.model.history.get("loss", [])
        best = min(losses, default=np.inf)
        stale = len(losses) - 1 - int(np.argmin(losses)) if losses else 0
        index, count = member
        bar = tqdm(total=count * self.epochs, initial=index * self.epochs + self.start_epoch,
                   desc="SpaMask" if count == 1 else f"SpaMask, model {index + 1} of {count}",
                   unit="epoch", disable=c.quiet or self.rank != 0, leave=False)
        self.module.train()
        with bar:
            for epoch in range(self.start_epoch, self.epochs):
                tic = time.perf_counter()
                seed_all(epoch_seed(c.seed, epoch, self.rank))
                with _quiet_dgl_loader():
                    if not self.minibatch:
                        sce, edge = self._full_epoch()
                    elif self.subgraphs is not None:
                        sce, edge = self._subgraph_epoch(epoch)
                    else:
                        sce, edge = self._minibatch_epoch(epoch)
                loss = sce + c.lam * edge
                seconds = time.perf_counter() - tic
                for name, value in (("loss", loss), ("sce", sce), ("edge", edge),
                                    ("seconds", seconds)):
                    self.model.history.setdefault(name, []).append(float(value))
                bar.set_postfix(loss=f"{loss:.4f}", sce=f"{sce:.4f}", edge=f"{edge:.4f}",
                                refresh=False)
                bar.update(1)
                if checkpoint and checkpoint_every and (epoch + 1) % checkpoint_every == 0 \
                        and self.rank == 0:
                    self.save_checkpoint(checkpoint, epoch + 1)
                if c.patience:
                    if loss < best - c.min_delta:
                        best, stale = loss, 0
                    else:
                        stale += 1
                        if stale >= c.patience:
                            logger.info("early stop at epoch %d (loss %.4f)", epoch, loss)
                            break
        self.module.eval()

    def save_checkpoint(self, path: str | Path, epochs_done: int) -> None:
        """Model, optimizer, epochs done, history and RNG states, written atomically."""
        from .io import atomic_write, remove_stale_parts

        remove_stale_parts(path)  # left by a run killed while writing (only rank 0 writes)
        payload = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "epochs_done": epochs_done, "history": self.model.history,
                   "average": None if self.average is None else self.average.state_dict(),
                   "config": self.config.to_dict(), "in_dim": self.model.in_dim,
                   "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                           "python": random.getstate()}}
        with atomic_write(path) as tmp:
            torch.save(payload, tmp)

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint of the same configuration (epochs may differ)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no checkpoint to resume from")
        payload = torch.load(path, map_location=self.device)
        saved = {k: v for k, v in payload["config"].items() if k not in ("epochs", "quiet")}
        mine = {k: v for k, v in self.config.to_dict().items() if k not in ("epochs", "quiet")}
        if saved != mine or payload["in_dim"] != self.model.in_dim:
            changed = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ConfigError(f"{path}: checkpoint of another configuration "
                              f"(differs in {', '.join(changed) or 'input dimension'})")
        self.module.load_state_dict(payload["module"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.average is not None and payload.get("average") is not None:
            self.average.load_state_dict(payload["average"])
        self.model.history = {k: list(v) for k, v in payload["history"].items()}
        self.start_epoch = int(payload["epochs_done"])
        torch.set_rng_state(payload["rng"]["torch"])
        np.random.set_state(payload["rng"]["numpy"])
        random.setstate(payload["rng"]["python"])
        logger.info("resumed from %s after epoch %d", path, self.start_epoch)

    def _step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update_parameters(self.module)

    def final_module(self) -> SpaMaskModule:
        """The module whose weights training hands over: the moving average of the weights
        (``ema_decay`` > 0) once a step was taken, else the trained module itself."""
        if self.average is None or int(self.average.n_averaged) == 0:
            return self.module
        return self.average.module

    def hand_over(self) -> None:
        """Put the weights training hands over (:meth:`final_module`) into the model, for
        embedding and saving; call once, after the last :meth:`fit`."""
        final = self.final_module()
        if final is not self.module:
            self.module.load_state_dict(final.state_dict())

    def _full_epoch(self) -> tuple[float, float]:
        c, g, x = self.config, self.graph, self.x
        n = g.num_nodes()
        masked = torch.zeros(n, dtype=torch.bool, device=x.device)
        masked[torch.randperm(n, device=x.device)[: int(c.mask_rate * n)]] = True
        w = self.norm
        kept, pos = self.masker.draw()
        pos = self._cap(pos, n)
        neg = self.negatives(pos[0])
        wk = gcn_norms(kept)
        sce, edge = self.net(
            dict(enc_graphs=[g, g], enc_weights=[w, w], dec_graph=g, dec_weight=w, x_in=x,
                 masked_in=masked, masked_mid=masked, x_target=x, masked_out=masked,
                 alpha=c.alpha),
            dict(enc_graphs=[kept, kept], enc_weights=[wk, wk], x_in=x, pos=pos, neg=neg))
        self._step(sce + c.lam * edge)
        return float(sce), float(edge)

    def _epoch_masks(self):
        """The epoch's masked nodes, kept graph and hidden pairs sorted by source (+ row ptr)."""
        n = self.graph.num_nodes()
        masked = torch.zeros(n, dtype=torch.bool)
        masked[torch.randperm(n)[: int(self.config.mask_rate * n)]] = True
        kept, pos = self.masker.draw()
        pos = pos[:, torch.argsort(pos[0], stable=True)]
        ptr = torch.cumsum(torch.bincount(pos[0], minlength=n), 0)
        return masked, kept, pos, ptr

    def _subgraph_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over random groups of spatial tiles, a halo-extended subgraph per step.

        Masks, hidden edges and the kept graph are drawn once per epoch on the whole graph, as
        in full-graph training; a step scores the masked spots and hidden edges of its core and
        draws negatives among its core spots of the same slice. With data-parallel ranks the
        number of groups is a multiple of world_size and each rank takes every world_size-th.
        Sharded, each rank draws groups of its own graph and all ranks take as many steps as
        the rank with the most groups (the others start their groups over), so no rank waits
        for a gradient that never comes.
        """
        c, x = self.config, self.x
        masked, kept, pos, ptr = self._epoch_masks()
        kept_deg = kept.in_degrees()
        gen = torch.Generator().manual_seed(epoch_seed(c.seed, epoch, rank=-1))
        groups = self.subgraphs.groups(gen, multiple_of=1 if self.sharded else self.world_size)
        if self.sharded and self.world_size > 1:
            from .shard import Collective

            steps = Collective().max(len(groups))
            groups = [groups[i % len(groups)] for i in range(steps)]
        elif self.world_size > 1:  # equal steps on every rank (padded when tiles are too few)
            steps = -(-len(groups) // self.world_size)
            groups = [groups[(i * self.world_size + self.rank) % len(groups)]
                      for i in range(steps)]
        slices = self.graph.ndata["slice"]
        deg = self.deg.cpu()  # once per epoch, not per step (a copy when training on a GPU)
        totals, dev = np.zeros(2), self.device
        for core in groups:
            if self.seed_log is not None:
                self.seed_log.append((epoch, core.clone()))
            sub, kept_sub, nid, is_core = self.subgraphs.subgraph(core, kept)
            pos_b = self._cap(rows_of(pos, ptr, core), core.numel())
            neg_b = NegativeSampler(self.graph, slices, candidates=core)(pos_b[0])
            m = pos_b.shape[1]
            pairs = torch.searchsorted(nid, torch.cat([pos_b, neg_b], 1)).to(dev)
            w = gcn_norms(sub, deg[nid])
            wk = gcn_norms(kept_sub, kept_deg[nid])
            sub, kept_sub = sub.to(dev), kept_sub.to(dev)
            w = tuple(t.to(dev) for t in w)
            wk = tuple(t.to(dev) for t in wk)
            x_sub, m_sub = x[nid].to(dev), masked[nid].to(dev)
            sce, edge = self.net(
                dict(enc_graphs=[sub, sub], enc_weights=[w, w], dec_graph=sub, dec_weight=w,
                     x_in=x_sub, masked_in=m_sub, masked_mid=m_sub, x_target=x_sub,
                     masked_out=m_sub & is_core.to(dev), alpha=c.alpha),
                dict(enc_graphs=[kept_sub, kept_sub], enc_weights=[wk, wk], x_in=x_sub,
                     pos=pairs[:, :m], neg=pairs[:, m:]))
            self._step(sce + c.lam * edge)
            totals += (float(sce), float(edge))
        return tuple(totals / max(len(groups), 1))

    def _cap(self, pos: torch.Tensor, n_nodes: int) -> torch.Tensor:
        m = int(self.config.edge_pairs_per_node * n_nodes)
        if m and pos.shape[1] > m:
            pos = pos[:, torch.randperm(pos.shape[1], device=pos.device)[:m]]
        return pos

    def _seed_order(self, n: int, epoch: int) -> torch.Tensor:
        """All nodes in this epoch's shuffled order: random spots, or random spatial tiles.

        Drawn from (seed, epoch) alone, so every data-parallel rank holds the same order and
        DGL's ``use_ddp`` split gives each rank a disjoint share of it.
        """
        gen = torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch, rank=-1))
        if self.tiles is None:
            return torch.randperm(n, generator=gen)
        n_tiles = int(self.tiles.max()) + 1
        rank_of_tile = torch.empty(n_tiles, dtype=torch.int64)
        rank_of_tile[torch.randperm(n_tiles, generator=gen)] = torch.arange(n_tiles)
        return torch.argsort(rank_of_tile[self.tiles] * n + torch.arange(n))

    def _loader(self, graph, nodes: torch.Tensor, fanouts, batch_size: int,
                use_ddp: bool = False):
        import dgl

        sampler = neighbor_sampler(fanouts)
        return dgl.dataloading.DataLoader(graph, nodes, sampler, batch_size=batch_size,
                                          shuffle=False, drop_last=False, use_ddp=use_ddp,
                                          use_prefetch_thread=False)

    def _minibatch_epoch(self, epoch: int) -> tuple[float, float]:
        import dgl

        c, g, x = self.config, self.graph, self.x
        n = g.num_nodes()
        masked, kept, pos, ptr = self._epoch_masks()
        kept_deg = kept.in_degrees().to(self.device)
        edge_sampler = neighbor_sampler(c.fanouts[:2])
        # batch_size is the global batch: each of the world_size ranks takes its share, so
        # the steps per epoch and the samples per step match single-process training
        per_rank = max(1, -(-c.batch_size // self.world_size))
        loader = self._loader(g, self._seed_order(n, epoch), c.fanouts, per_rank,
                              use_ddp=self.world_size > 1)
        totals, n_batches = np.zeros(2), 0
        for input_nodes, seeds, blocks in loader:
            if self.seed_log is not None:
                self.seed_log.append((epoch, seeds.clone()))
            blocks = [b.to(self.device) for b in blocks]
            w = [gcn_norms(b, self.deg) for b in blocks]
            mid = blocks[2].srcdata[dgl.NID].cpu()
            x_in = x[input_nodes].to(self.device)
            x_out = x[seeds].to(self.device)
            m_in, m_mid, m_out = (masked[ids].to(self.device) for ids in (input_nodes, mid, seeds))
            pos_b = self._cap(rows_of(pos, ptr, seeds), seeds.numel())
            neg_b = self.negatives(pos_b[0])
            nodes, inverse = torch.unique(torch.cat([pos_b, neg_b], 1), return_inverse=True)
            in2, _, blocks2 = edge_sampler.sample(kept, nodes)
            blocks2 = [b.to(self.device) for b in blocks2]
            w2 = [gcn_norms(b, kept_deg) for b in blocks2]
            m = pos_b.shape[1]
            sce, edge = self.net(
                dict(enc_graphs=blocks[:2], enc_weights=w[:2], dec_graph=blocks[2],
                     dec_weight=w[2], x_in=x_in, masked_in=m_in, masked_mid=m_mid,
                     x_target=x_out, masked_out=m_out, alpha=c.alpha),
                dict(enc_graphs=blocks2, enc_weights=w2, x_in=x[in2].to(self.device),
                     pos=inverse[:, :m].to(self.device), neg=inverse[:, m:].to(self.device)))
            self._step(sce + c.lam * edge)
            totals += (float(sce), float(edge))
            n_batches += 1
        return tuple(totals / max(n_batches, 1))


@torch.no_grad()
def inference(module: SpaMaskModule, graph, x: np.ndarray, device: torch.device,
              batch_size: int) -> np.ndarray:
    """Encoder output for every node, layer by layer over full neighbourhoods.

    Each layer is computed for ``batch_size`` destination nodes at a time (as in DGL's GraphSAGE
    example), so device memory stays bounded; host memory holds two (n, dim) matrices.
    """
    import dgl

    module = module.to(device).eval()
    graph = graph.to("cpu")
    deg = graph.in_degrees()
    n = graph.num_nodes()
    blocks = [full_block(graph, torch.arange(i, min(i + batch_size, n)))
              for i in range(0, n, batch_size)]
    h = torch.from_numpy(np.ascontiguousarray(x))
    for i in range(module.encoder.n_layers):
        out = None
        for block in blocks:
            block = block.to(device)
            norm = gcn_norms(block, deg.to(device))
            hi = module.encoder.layer(i, block, h[block.srcdata[dgl.NID].cpu()].to(device), norm)
            if out is None:
                out = torch.empty(n, hi.shape[1])
            out[block.dstdata[dgl.NID].cpu()] = hi.cpu()
        h = out
    return h.numpy()
