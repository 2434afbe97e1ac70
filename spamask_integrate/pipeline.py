"""``run``: the whole pipeline in one call. It chains the steps and records what each did; all
logic lives in the step modules."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anndata as ad

from .cluster import KEEP_STARTS, N_COMPONENTS, N_STARTS, SPATIAL_PRIOR, check_caller, cluster
from .config import Keys, SpamaskConfig
from .context import CONTEXT_WEIGHT, caller_input, check_weight
from .errors import ConfigError
from .graph import build_graph
from .io import read_slices, slice_categories, write_outputs
from .metrics import evaluate
from .preprocess import preprocess
from .train import train, versions
from .utils import record, release_freed_memory

logger = logging.getLogger(__name__)


def run(
    sources: Any,
    out_dir: str | Path | None = None,
    *,
    batch_key: str = Keys.BATCH,
    label_key: str | None = None,
    slice_column: str | None = None,
    n_domains: int | None = 7,
    cluster_method: str = "gmm",
    harmony: bool | None = None,
    refine: bool = False,
    n_starts: int = N_STARTS,
    keep_starts: float = KEEP_STARTS,
    spatial_prior: float = SPATIAL_PRIOR,
    n_components: int | str | None = N_COMPONENTS,
    context_weight: float = CONTEXT_WEIGHT,
    graph_method: str = "knn",
    k: int | None = None,
    radius: float | None = None,
    platform: str | None = None,
    preprocess_kwargs: dict[str, Any] | None = None,
    config: SpamaskConfig | None = None,
    scib: bool = True,
    scib_max_spots: int | str = "auto",
    figures: bool = True,
    report: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    nproc: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    shard_slices: bool = False,
    **train_overrides: Any,
) -> ad.AnnData:
    """Read -> preprocess -> graph -> train -> integrate -> cluster -> evaluate -> write.

    Parameters
    ----------
    sources
        What :func:`read_slices` takes, or an AnnData already holding the slices (raw counts,
        ``obsm["spatial"]``, ``obs[batch_key]``).
    slice_column
        An ``obs`` column that splits each file (or the AnnData given) into slices, for an
        atlas stored as one h5ad with a sample column (see :func:`read_slices`).
    out_dir
        Where :func:`write_outputs` puts the files; ``None`` writes nothing.
    report
        Also write the self-contained ``report.html`` into ``out_dir``.
    harmony
        Harmony on the embedding; ``None`` = on when there are several slices.
    n_starts, keep_starts, spatial_prior, n_components
        The domain caller's GMM starts, the share of them (the most likely) it picks the
        most typical one from, its Potts strength and the mixture components before they
        are joined into K domains (``"auto"``, the default: K and 2 K joined, K kept only
        if the join loses in space and in expression; ``None``: K, no merge; a number M:
        always joined; see :func:`cluster`).
    context_weight
        The caller clusters the embedding beside the spatial context of the model input,
        weighted so (see :func:`context_embedding`); 0 clusters the embedding alone.
    checkpoint, checkpoint_every, resume
        Training checkpoints, as in :func:`train`.
    nproc, nnodes, node_rank, master_addr, master_port
        Data-parallel minibatch training with ``nproc`` processes per node through torchrun
        (see :mod:`spamask_integrate.distributed`). Nodes other than 0 return after training,
        without embedding or writing.
    shard_slices
        A slice-sharded run (:mod:`spamask_integrate.shard`): the ``nproc`` x ``nnodes`` ranks
        each read, preprocess, train on and embed only their share of the slices (balanced by
        spot count); this process gathers their results (``obsm["X_pca"]`` and
        ``obsm["X_spamask"]`` as 30-d PCAs, the graph, ``obs``; no counts) and goes on with
        Harmony, the domains and the scores. For atlases larger than one machine's memory.
    train_overrides
        Fields of :class:`SpamaskConfig` (``epochs``, ``seed``, ``minibatch``, ``device``, ...);
        ``seed`` also seeds preprocessing, Harmony, clustering and scoring.

    Returns the AnnData with every result; ``uns["spamask"]["run"]`` holds the parameters,
    versions and seconds per step.
    """
    config = (config or SpamaskConfig()).replace(**train_overrides)
    seed = config.seed
    check_weight(context_weight)  # before the training, not after it
    check_caller(n_starts, keep_starts, spatial_prior, n_components)
    if shard_slices or nproc > 1 or nnodes > 1:
        config.require_one_model("nproc/nnodes > 1 or shard_slices")
    timings: dict[str, float] = {}

    @contextmanager
    def step(name: str):
        logger.info("step: %s", name)
        tic = time.perf_counter()
        yield
        release_freed_memory()
        timings[name] = round(time.perf_counter() - tic, 3)

    if shard_slices:
        if isinstance(sources, ad.AnnData):
            raise ConfigError("shard_slices: a sharded run reads its slices from files; give "
                              "paths or a manifest, not an AnnData")
        adata = _run_sharded(sources, config, timings, batch_key=batch_key, label_key=label_key,
                             slice_column=slice_column, k=k, graph_method=graph_method,
                             radius=radius, platform=platform,
                             preprocess_kwargs=preprocess_kwargs, nproc=nproc, nnodes=nnodes,
                             node_rank=node_rank, master_addr=master_addr,
                             master_port=master_port, checkpoint=checkpoint,
                             checkpoint_every=checkpoint_every, resume=resume)
        if adata is None:
            logger.info("node %d: sharded run done; node 0 writes the results", node_rank)
            return ad.AnnData()
    else:
        adata, done = _read_and_train(
            sources, config, step, batch_key=batch_key, label_key=label_key,
            slice_column=slice_column, k=k, graph_method=graph_method, radius=radius,
            platform=platform, preprocess_kwargs=preprocess_kwargs, nproc=nproc, nnodes=nnodes,
            node_rank=node_rank, master_addr=master_addr, master_port=master_port,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
        if not done:
            logger.info("node %d: training done; node 0 writes the results", node_rank)
            return adata
    n_slices = adata.obs[batch_key].nunique()
    use_harmony = (n_slices > 1) if harmony is None else bool(harmony)
    _, rep = caller_input(adata, batch_key, weight=context_weight, harmony=use_harmony,
                          seed=seed, step=step)
    with step("cluster"):
        cluster(adata, n_domains, cluster_method, use_rep=rep, batch_key=batch_key,
                refine=refine, n_starts=n_starts, keep_starts=keep_starts,
                spatial_prior=spatial_prior, n_components=n_components, seed=seed)
    with step("evaluate"):
        keys = [Keys.PCA, Keys.EMB] + ([Keys.EMB_HARMONY] if use_harmony else [])
        metrics = evaluate(adata, label_key, batch_key, keys if scib else None, scib=scib,
                           scib_max_spots=scib_max_spots, seed=seed)
    params = {"nproc": nproc, "nnodes": nnodes, "shard_slices": shard_slices,
              "batch_key": batch_key, "label_key": label_key or "",
              "slice_column": slice_column or "", "n_domains": n_domains or 0,
              "cluster_method": cluster_method, "harmony": use_harmony, "refine": refine,
              "n_starts": n_starts, "keep_starts": keep_starts, "spatial_prior": spatial_prior,
              "n_components": 0 if n_components is None else n_components,
              "context_weight": context_weight,
              "graph_method": graph_method, "k": k or 0, "radius": radius or 0,
              "platform": platform or "", "preprocess": preprocess_kwargs or {},
              "train": config.to_dict(), "scib": scib, "scib_max_spots": scib_max_spots}
    record(adata, "run", {"params": params, "seconds": timings, "versions": versions()})
    if out_dir is not None:
        with step("write"):
            write_outputs(adata, out_dir, metrics, batch_key=batch_key, figures=figures,
                          seed=seed, report=report)
        adata.uns[Keys.UNS]["run"]["seconds"] = timings
    logger.info("run finished: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return adata


def _read_and_train(sources, config, step, *, batch_key, label_key, slice_column, k,
                    graph_method, radius, platform, preprocess_kwargs, nproc, nnodes, node_rank,
                    master_addr, master_port, checkpoint, checkpoint_every, resume):
    """Read, preprocess, build the graph and train in this process (training itself possibly
    data-parallel); ``(adata, False)`` on a node other than 0, which holds no model."""
    with step("read"):
        if isinstance(sources, ad.AnnData):
            adata = sources
            if slice_column is not None:
                adata.obs[batch_key] = slice_categories(adata.obs, slice_column,
                                                        "the AnnData given")
            if batch_key not in adata.obs:
                raise ConfigError(f"obs[{batch_key!r}] not found in the AnnData given")
        else:
            adata = read_slices(sources, batch_key=batch_key, label_key=label_key,
                                slice_column=slice_column, min_spots=(k or 6) + 1,
                                counts_layer=False)  # preprocess makes the layer
    with step("preprocess"):
        preprocess(adata, batch_key=batch_key, seed=config.seed, **(preprocess_kwargs or {}))
    with step("graph"):
        graph = build_graph(adata, batch_key, graph_method, k, radius, platform=platform)
    with step("train"):
        if nproc > 1 or nnodes > 1:
            model = _train_parallel(adata, graph, batch_key, config, nproc, nnodes, node_rank,
                                    master_addr, master_port, checkpoint, checkpoint_every,
                                    resume)
            if model is None:
                return adata, False
        else:
            train(adata, graph, batch_key, config, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every, resume=resume)
    return adata, True


def _run_sharded(sources, config, timings, *, batch_key, label_key, slice_column, k,
                 graph_method, radius, platform, preprocess_kwargs, nproc, nnodes, node_rank,
                 master_addr, master_port, checkpoint, checkpoint_every, resume):
    """The ranks' part of a sharded run; their slowest rank's seconds per stage go into
    ``timings``. ``None`` on a node other than 0."""
    from .distributed import run_sharded

    tic = time.perf_counter()
    adata, _ = run_sharded(
        sources, config, nproc=nproc, nnodes=nnodes, node_rank=node_rank,
        master_addr=master_addr, master_port=master_port, batch_key=batch_key,
        label_key=label_key, slice_column=slice_column, min_spots=(k or 6) + 1,
        preprocess_kwargs=preprocess_kwargs,
        graph_kwargs={"method": graph_method, "k": k, "radius": radius, "platform": platform},
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume)
    if adata is None:
        return None
    stages = adata.uns[Keys.UNS]["shard"]["stages"]
    for stage in ("read", "preprocess", "graph", "train", "embed"):
        timings[stage] = max(float(per_rank[stage]["seconds"]) for per_rank in stages.values())
    timings["sharded_total"] = round(time.perf_counter() - tic, 3)
    return adata


def _train_parallel(adata, graph, batch_key, config, nproc, nnodes, node_rank, master_addr,
                    master_port, checkpoint, checkpoint_every, resume):
    from .distributed import train_distributed
    from .train import embed_and_record, resolve_device, training_epochs, training_mode

    tic = time.perf_counter()
    model = train_distributed(adata, batch_key, config, nproc=nproc, nnodes=nnodes,
                              node_rank=node_rank, master_addr=master_addr,
                              master_port=master_port, checkpoint=checkpoint,
                              checkpoint_every=checkpoint_every, resume=resume)
    if model is not None:
        embed_and_record(adata, model, graph, batch_key=batch_key, key_added=Keys.EMB,
                         mode=f"{training_mode(config, True)}-ddp",
                         device=resolve_device(config.device),
                         train_seconds=time.perf_counter() - tic, processes=nproc * nnodes,
                         epochs=training_epochs(config, adata.n_obs, minibatch=True))
    return model
