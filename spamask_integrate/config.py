"""Configuration of the SpaMask model and trainer, and the AnnData key names used everywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError


class Keys:
    """Default AnnData keys; every function takes its own key arguments, these are the defaults."""

    BATCH = "slice"
    SPATIAL = "spatial"
    COUNTS = "counts"
    PCA = "X_pca"
    EMB = "X_spamask"
    EMB_HARMONY = "X_spamask_harmony"
    # what the domain caller sees (context.context_embedding), and its Harmony correction
    EMB_CONTEXT = "X_spamask_context"
    EMB_CONTEXT_HARMONY = "X_spamask_context_harmony"
    DOMAIN = "domain"
    UNS = "spamask"
    CONNECTIVITIES = "spamask_connectivities"


@dataclass(frozen=True)
class SpamaskConfig:
    """Every hyper-parameter of the model and the trainer.

    The comment beside each field gives the value of the reference implementation (wenwenmin/SpaMask,
    multi-slice run) where ours differs or where the reference has several.
    """

    # encoder
    hidden_dim: int = 512  # reference 512
    latent_dim: int = 256  # reference 256
    batch_norm: bool = True  # reference True
    # GAE channel (node masking)
    mask_rate: float = 0.5  # reference 0.5 multi-slice, 0.3 single slice
    mask_mode: str = "replace"  # "replace" (GraphMAE); "reference" adds the token to the features
    alpha: float = 2.0  # exponent of the scaled cosine error; reference 2
    # GCL channel (edge masking)
    edge_drop_rate: float = 0.2  # reference 0.2 multi-slice, 0.6 single slice
    edge_mask: str = "undirected"  # "undirected" pairs; "reference" drops directed edges
    edge_decoder_hidden: int = 512  # reference 512
    edge_decoder_dropout: float = 0.5  # reference 0.5
    # dropped edges scored per step, at most this many per node of the step's graph or seed
    # batch (0: all). An unbiased subsample of the same loss; keeps the edge decoder, which
    # would otherwise dominate the epoch at k=21, near the encoder's cost. Reference: all.
    edge_pairs_per_node: float = 1.0
    lam: float = 2.0  # weight of the edge loss; reference 2
    # optimisation
    lr: float = 1e-3  # reference 1e-3
    weight_decay: float = 2e-4  # reference 2e-4
    grad_clip: float = 5.0  # reference 5
    # the weights training hands over: a moving average of the weights of every optimiser
    # step, step s of t weighted by ema_decay ** (t - s) (0: the last weights, as the
    # reference). At 10^6 tiled spots it kept the partition the last weights lost (benchmarks/
    # README.md, "Weight averaging", which also gives the DLPFC seeds).
    ema_decay: float = 0.99
    # "auto" (see train.training_epochs): full_graph_epochs on the whole graph; minibatch
    # training gets budget_steps steps' worth of subgraph_size spots (150: the 100k-spot
    # convergence study plateaus from 84 steps); an int trains that many epochs.
    # Reference: 1000 epochs (multi-slice run). Full graph 100: on the four DLPFC slices,
    # 10 seeds each, 100 epochs score 0.587 +- 0.011, 120 epochs 0.587 +- 0.005 and 150
    # 0.578 +- 0.021 (benchmarks/README.md "Training budget"); 100 keeps the default run of
    # the four slices within 2 minutes on 2 cores.
    epochs: int | str = "auto"
    full_graph_epochs: int = 100
    budget_steps: int = 150
    seed: int = 2023  # reference 2023
    # models trained side by side, the first with ``seed`` and the others with seeds drawn
    # from it; the embedding is theirs side by side (n_models * latent_dim columns). On the
    # four DLPFC slices, 3 models (three times the training) scored 0.588 +- 0.005 over 10
    # seeds, worst 0.582, where one model scores 0.579 +- 0.020 over 30 seeds, worst 0.510
    # (benchmarks/README.md "Several models side by side"). Reference: one.
    n_models: int = 1
    # early stopping on a loss plateau (patience 0 disables it)
    patience: int = 0
    min_delta: float = 1e-4
    # minibatch training: spatial tile subgraphs (default) or neighbour sampling
    minibatch: bool | None = None  # None: automatic, by graph size
    # spots above which minibatch training is chosen: the full graph only while it fits one
    # step of subgraph_size; above, tile subgraphs are faster per spot (100k spots: 11.4k
    # spots/s against 6.8k for the full graph, benchmarks/README.md)
    minibatch_threshold: int = 16_384
    sampler: str = "subgraph"  # "subgraph": tile groups with a halo; "neighbor": DGL sampling
    subgraph_size: int = 16_384  # core spots of one subgraph step
    subgraph_tile_size: int = 2_048  # spots of one spatial tile (the unit a group is made of)
    halo: int = 3  # hops around a group's core; 3 = receptive field (2 encoder + 1 decoder)
    batch_size: int = 1024  # seed spots of one neighbour-sampled minibatch
    fanouts: tuple[int, ...] = field(default=(10, 10, 10))  # 2 encoder layers + 1 decoder layer
    # a minibatch is batch_size / tile_size random spatial tiles of tile_size neighbouring
    # spots (0: independent random seeds); tiles share their sampled neighbourhoods
    tile_size: int = 128
    inference_batch_size: int = 16_384
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    quiet: bool = False

    def validate(self) -> SpamaskConfig:
        """Check every value; raise :class:`ConfigError` naming the first bad one."""
        if not (self.epochs == "auto" or (isinstance(self.epochs, (int, np.integer))
                                          and not isinstance(self.epochs, bool)
                                          and self.epochs >= 1)):
            raise ConfigError(f"epochs={self.epochs!r}: must be 'auto' or a positive integer")
        positive = ("hidden_dim", "latent_dim", "edge_decoder_hidden", "batch_size",
                    "minibatch_threshold", "inference_batch_size", "budget_steps", "full_graph_epochs",
                    "subgraph_size", "subgraph_tile_size", "n_models")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be a positive integer")
        for name in ("mask_rate", "edge_drop_rate"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name}={value}: must be strictly between 0 and 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay}: must be in [0, 1) (0: no average)")
        if not 0.0 <= self.edge_decoder_dropout < 1.0:
            raise ConfigError(f"edge_decoder_dropout={self.edge_decoder_dropout}: must be in [0, 1)")
        if self.mask_mode not in ("replace", "reference"):
            raise ConfigError(f"mask_mode={self.mask_mode!r}: use 'replace' or 'reference'")
        if self.sampler not in ("subgraph", "neighbor"):
            raise ConfigError(f"sampler={self.sampler!r}: use 'subgraph' or 'neighbor'")
        if self.edge_mask not in ("undirected", "reference"):
            raise ConfigError(f"edge_mask={self.edge_mask!r}: use 'undirected' or 'reference'")
        for name in ("alpha", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be positive")
        for name in ("lam", "weight_decay", "grad_clip", "patience", "min_delta", "edge_pairs_per_node",
                     "tile_size", "halo"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must not be negative")
        if len(self.fanouts) != 3 or any(int(f) < 1 for f in self.fanouts):
            raise ConfigError(
                f"fanouts={self.fanouts}: give 3 positive fan-outs (2 encoder layers + decoder)"
            )
        if not (self.device in ("auto", "cpu") or str(self.device).startswith("cuda")):
            raise ConfigError(f"device={self.device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
        return self

    def require_one_model(self, what: str) -> None:
        """Raise :class:`ConfigError` when ``n_models > 1``: ``what`` trains one model."""
        if self.n_models > 1:
            raise ConfigError(f"n_models={self.n_models}: several models train in one "
                              f"process; set n_models=1 for {what}")

    def replace(self, **overrides: Any) -> SpamaskConfig:
        """Return a copy with ``overrides`` applied and validated; unknown names raise."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown training parameter(s): {', '.join(unknown)}")
        if isinstance(overrides.get("epochs"), str) and overrides["epochs"] != "auto":
            text = overrides["epochs"].strip()
            if not text.isdigit():
                raise ConfigError(f"epochs={text!r}: must be 'auto' or a positive integer")
            overrides["epochs"] = int(text)
        if "fanouts" in overrides and overrides["fanouts"] is not None:
            overrides["fanouts"] = tuple(int(f) for f in overrides["fanouts"])
        return dataclasses.replace(self, **overrides).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the values (h5ad- and JSON-writable: no None)."""
        out = dataclasses.asdict(self)
        out["fanouts"] = list(self.fanouts)
        out["minibatch"] = "auto" if self.minibatch is None else bool(self.minibatch)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SpamaskConfig:
        """Inverse of :meth:`to_dict`."""
        values = dict(values)
        if values.get("minibatch") == "auto":
            values["minibatch"] = None
        return cls().replace(**values)
