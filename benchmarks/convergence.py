"""Convergence study for the training budget: ARI against optimiser steps on tiled DLPFC data.

One seeded training run per size with the default configuration (the mode and step size the
defaults choose at that size: full graph up to 100,000 spots, tile subgraphs of 16,384 spots
above), continued past the default budget; after the epochs nearest to the listed multiples
of the default budget (``epochs="auto"``) the encoder embeds every spot and the default pipeline finishes the job (Harmony
on the slices, the domain caller, K = 7). ARI is the mean over slices of the per-slice ARI
against obs["layer"] (as in every DLPFC table) and the pooled ARI over all spots.

``--spots dlpfc`` takes the four shared DLPFC slices themselves (all genes, default
preprocessing: the data of the accuracy tables) instead of tiled data; ``--seeds`` repeats the
study over seeds (the table then gives mean and sd per budget).

Usage: python benchmarks/convergence.py --spots 100000 [--budgets 0.1,0.25,0.5,1,1.5]
       python benchmarks/convergence.py --spots dlpfc --epochs 50,100,150,200,300 --seeds 0,1,2
Result: benchmarks/results/convergence_<spots>.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from _common import dlpfc_files, write_result
from tiled import prepped


def score(adata, seed: int) -> dict:
    import spamask_integrate as si

    si.integrate(adata, seed=seed)
    si.cluster(adata, 7, seed=seed)
    truth = adata.obs["layer"].astype(str).to_numpy()
    dom = adata.obs["domain"].astype(str).to_numpy()
    codes = adata.obs["slice"].cat.codes.to_numpy()
    per = [adjusted_rand_score(truth[codes == c], dom[codes == c]) for c in np.unique(codes)]
    return {"ari_mean_slice": float(np.mean(per)), "ari_sd_slice": float(np.std(per)),
            "ari_pooled": float(adjusted_rand_score(truth, dom)),
            "nmi_pooled": float(normalized_mutual_info_score(truth, dom))}


def dlpfc():
    """The four shared DLPFC slices, default preprocessing and graph."""
    import spamask_integrate as si

    adata = si.read_slices([str(f) for f in dlpfc_files()])
    si.preprocess(adata)
    si.build_graph(adata)
    return adata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", required=True, help="a number of tiled spots, or dlpfc")
    parser.add_argument("--budgets", default="0.1,0.25,0.5,1,1.5",
                        help="multiples of the default training budget")
    parser.add_argument("--epochs", default=None,
                        help="epochs to score at (instead of --budgets), e.g. 50,100,300")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    args = parser.parse_args()
    adata = dlpfc() if args.spots == "dlpfc" else prepped(int(args.spots))
    runs = [study(adata, seed, args) for seed in (int(s) for s in args.seeds.split(","))]
    name = "dlpfc" if args.spots == "dlpfc" else adata.n_obs
    write_result(f"convergence_{name}", {
        "n_spots": adata.n_obs, "n_slices": int(adata.obs["slice"].nunique()),
        "data": "the four shared DLPFC slices" if args.spots == "dlpfc" else "tiled DLPFC",
        **{k: runs[0][k] for k in ("mode", "steps_per_epoch", "default_epochs", "config")},
        "seeds": [r["seed"] for r in runs], "points": runs[0]["points"],
        "runs": [{"seed": r["seed"], "points": r["points"]} for r in runs]})


def study(adata, seed: int, args) -> dict:
    import spamask_integrate as si
    from spamask_integrate.graph import to_dgl
    from spamask_integrate.train import (SpaMask, Trainer, inference, seed_all,
                                         training_epochs, training_tiles)

    graph = to_dgl(adata, "slice")
    x = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    config = si.SpamaskConfig(quiet=True, device="cpu", seed=seed)
    minibatch = adata.n_obs > config.minibatch_threshold
    seed_all(config.seed)
    model = SpaMask(config, x.shape[1])
    tiles = training_tiles(adata, config, "slice") if minibatch else None
    trainer = Trainer(model, graph, x, torch.device("cpu"), minibatch=minibatch, tiles=tiles)
    steps_per_epoch = len(trainer.subgraphs.groups(torch.Generator().manual_seed(0))) \
        if trainer.subgraphs is not None else 1
    default_epochs = training_epochs(config, adata.n_obs, minibatch)
    if args.epochs:
        targets = sorted({int(e) for e in args.epochs.split(",")})
    else:
        targets = sorted({max(1, round(float(b) * default_epochs))
                          for b in args.budgets.split(",")} | {default_epochs})
    points, train_seconds = [], 0.0
    for epoch in range(max(targets)):
        tic = time.perf_counter()
        trainer.start_epoch, trainer.epochs = epoch, epoch + 1
        trainer.fit()
        train_seconds += time.perf_counter() - tic
        if epoch + 1 in targets:
            tic = time.perf_counter()
            adata.obsm["X_spamask"] = inference(trainer.final_module(), graph, x,
                                                torch.device("cpu"),
                                                config.inference_batch_size)
            point = {"epochs": epoch + 1, "budget": (epoch + 1) / default_epochs,
                     "steps": (epoch + 1) * steps_per_epoch,
                     "spot_visits": (epoch + 1) * adata.n_obs, "train_seconds": train_seconds,
                     "default_budget": epoch + 1 == default_epochs,
                     "loss": model.history["loss"][-1], **score(adata, seed),
                     "score_seconds": time.perf_counter() - tic}
            points.append(point)
            print({"seed": seed, **{k: round(v, 4) if isinstance(v, float) else v
                                    for k, v in point.items()}}, flush=True)
    return {"mode": "subgraph" if minibatch else "full-graph", "steps_per_epoch": steps_per_epoch,
            "default_epochs": default_epochs, "seed": seed, "config": config.to_dict(),
            "points": points}


if __name__ == "__main__":
    main()
