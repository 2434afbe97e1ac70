"""Which weights should training hand over? The last ones, or an average over the steps.

One seeded training run per seed with the default budget; three embeddings of the same run
are scored by the default pipeline (Harmony, the domain caller, K = 7; mean over slices of
the per-slice ARI against obs["layer"]):

- ``last``: the weights after the last step (``ema_decay=0``, the reference's choice);
- ``ema``: the trainer's moving average (``ema_decay=0.99``, the default since this study):
  after every step, the mean of all steps' weights so far, step s of t weighted by
  0.99 ** (t - s), batch-norm statistics averaged too;
- ``swa``: the plain mean of the weights over the last third of the steps (stochastic weight
  averaging), batch-norm statistics averaged too.

``--spots dlpfc`` takes the four shared DLPFC slices (full-graph training); a number takes the
tiled DLPFC data of that many spots (tile subgraphs, as the defaults choose there).

``--variants`` scores only some of the three (the training, and so ``last``, is the same).

Usage: python benchmarks/weight_average.py --spots dlpfc --seeds 0,1,2,3,4,5,6,7,8,9
       python benchmarks/weight_average.py --spots 1000000 --seeds 2023
Result: benchmarks/results/weight_average_<spots>.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import write_result
from convergence import dlpfc, score
from tiled import prepped


def one_seed(adata, seed: int, variants: list[str]) -> dict:
    from torch.optim.swa_utils import AveragedModel

    import spamask_integrate as si
    from spamask_integrate.graph import to_dgl
    from spamask_integrate.train import SpaMask, Trainer, inference, seed_all, training_tiles

    graph = to_dgl(adata, "slice")
    x = np.asarray(adata.obsm["X_pca"], dtype=np.float32)
    config = si.SpamaskConfig(quiet=True, device="cpu", seed=seed, ema_decay=0.99)
    minibatch = adata.n_obs > config.minibatch_threshold
    seed_all(config.seed)
    model = SpaMask(config, x.shape[1])
    tiles = training_tiles(adata, config, "slice") if minibatch else None
    trainer = Trainer(model, graph, x, torch.device("cpu"), minibatch=minibatch, tiles=tiles)
    epochs = trainer.epochs
    swa = AveragedModel(model.module, use_buffers=True)
    swa_from = epochs - max(1, epochs // 3)  # the last third of the epochs (and so of steps)
    step, in_window, steps = trainer._step, [False], [0]

    def step_and_average(loss):
        step(loss)  # the optimiser step, then the trainer's own moving average
        steps[0] += 1
        if in_window[0]:
            swa.update_parameters(model.module)

    trainer._step = step_and_average
    tic = time.perf_counter()
    for epoch in range(epochs):
        in_window[0] = epoch >= swa_from
        trainer.start_epoch, trainer.epochs = epoch, epoch + 1
        trainer.fit()
    row = {"seed": seed, "epochs": epochs, "steps": steps[0], "swa_from_epoch": swa_from,
           "train_seconds": time.perf_counter() - tic}
    modules = {"last": model.module, "ema": trainer.final_module(), "swa": swa.module}
    for name in variants:
        module = modules[name]
        adata.obsm["X_spamask"] = inference(module, graph, x, torch.device("cpu"),
                                            config.inference_batch_size)
        row[name] = score(adata, seed)
    print({k: (v["ari_mean_slice"] if isinstance(v, dict) else v) for k, v in row.items()},
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spots", required=True, help="a number of tiled spots, or dlpfc")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--variants", default="last,ema,swa", help="which weights to score")
    parser.add_argument("--suffix", default="", help="appended to the result file's name")
    args = parser.parse_args()
    variants = args.variants.split(",")
    adata = dlpfc() if args.spots == "dlpfc" else prepped(int(args.spots))
    rows = [one_seed(adata, int(s), variants) for s in args.seeds.split(",")]
    summary = {}
    for name in variants:
        ari = np.array([r[name]["ari_mean_slice"] for r in rows])
        summary[name] = {"mean": float(ari.mean()),
                         "sd": float(ari.std(ddof=1)) if len(ari) > 1 else 0.0,
                         "min": float(ari.min())}
        if "last" in variants:
            paired = ari - np.array([r["last"]["ari_mean_slice"] for r in rows])
            summary[name].update(paired_vs_last=float(paired.mean()), paired_sd=float(
                paired.std(ddof=1)) if len(ari) > 1 else 0.0)
        print(name, summary[name], flush=True)
    name = "dlpfc" if args.spots == "dlpfc" else adata.n_obs
    write_result(f"weight_average_{name}{args.suffix}", {
        "n_spots": adata.n_obs, "n_slices": int(adata.obs["slice"].nunique()),
        "seeds": [r["seed"] for r in rows], "summary": summary, "runs": rows})


if __name__ == "__main__":
    main()
