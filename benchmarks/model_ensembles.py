"""Does training several models and concatenating their embeddings steady the domains?

Two steps, so that one set of trainings serves every comparison:

``train``: for each seed, one model with a plan's defaults (the benchmark harness's own
preprocessing, graph and training of a plan's first dataset and variant); its embedding is
saved to ``--store``/<tag>_<seed>.npz, the labels and slices to ``--store``/meta_<tag>.npz.

``score``: the default caller on the caller's input as ``run`` builds it (the context block
beside the embedding, Harmony when the plan has it; ``--context-weight 0``: the embedding
alone, as before 2026-12-06), K from the plan, on the harness's spots and spot names; mean
over slices of the per-slice ARI; on

- each seed's embedding alone (what ``n_models=1`` gives for that seed);
- independent pairs (seeds 2i, 2i+1) and triples (3i, 3i+1, 3i+2) side by side, as
  ``n_models=2`` and ``3`` build their embedding (the members of a real ``n_models`` run have
  seeds drawn from one seed instead; plans/dlpfc_models.yaml measures those).

Usage: python benchmarks/model_ensembles.py train benchmarks/plans/dlpfc_epochs.yaml
           --variant epochs_100 --tag dlpfc --seeds 0-29 --store /tmp/ensembles
       python benchmarks/model_ensembles.py score benchmarks/plans/dlpfc_epochs.yaml
           --variant epochs_100 --tag dlpfc --seeds 0-29 --store /tmp/ensembles
Result: benchmarks/results/model_ensembles_<tag>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import (PlanData, seed_list, stored_embedding, stored_embedding_path,
                     write_result)


def train(plan_path: str, variant: str, tag: str, seeds: list[int], store: Path) -> None:
    from spamask_integrate import benchmark as B
    from spamask_integrate.graph import to_dgl
    from spamask_integrate.train import train as fit

    plan = B.load_plan(plan_path)
    ds, adata = B._prepared(plan, plan["datasets"][0]["name"], variant, {})
    _, opts, _, _ = B._options(plan, ds, variant)
    batch_key = ds.get("batch_key", "slice")
    store.mkdir(parents=True, exist_ok=True)
    np.savez(store / f"meta_{tag}.npz", slice=adata.obs[batch_key].astype(str).to_numpy(),
             label=adata.obs[ds["label_key"]].astype(str).to_numpy(),
             xy=np.asarray(adata.obsm["spatial"]))
    graph = to_dgl(adata, batch_key)
    for seed in seeds:
        fit(adata, graph, batch_key, seed=seed, quiet=True, **opts)
        np.savez(stored_embedding_path(store, tag, seed), emb=np.asarray(adata.obsm["X_spamask"]))
        print(f"seed {seed} trained", flush=True)


def score(plan_path: str, variant: str, tag: str, seeds: list[int], store: Path,
          context_weight: float | None = None, target: float = 0.58) -> dict:
    import spamask_integrate as si
    from spamask_integrate.context import CONTEXT_WEIGHT

    weight = CONTEXT_WEIGHT if context_weight is None else context_weight
    data = PlanData(plan_path, variant)  # the harness's spots, names and model input
    adata, batch_key, k_domains = data.adata, data.batch_key, data.k

    def ari(x: np.ndarray, seed: int) -> float:
        """The caller's input as ``run`` builds it (``caller_input``: the context block
        beside the embedding, Harmony when the plan has it), then the default caller."""
        adata.obsm["X_spamask"] = np.ascontiguousarray(x, dtype=np.float32)
        _, rep = si.caller_input(adata, batch_key, weight=weight, harmony=data.harmony,
                                 seed=seed)
        si.cluster(adata, k_domains, "gmm", use_rep=rep, batch_key=batch_key, seed=seed,
                   key_added="ensemble")
        return data.score("ensemble")

    def embedding(seed: int) -> np.ndarray:
        return stored_embedding(store, tag, seed)

    out = {"single": {}, "pairs": {}, "triples": {}}
    for seed in seeds:
        out["single"][str(seed)] = ari(embedding(seed), seed)
        print("single", seed, round(out["single"][str(seed)], 4), flush=True)
    for n, name in ((2, "pairs"), (3, "triples")):
        for i in range(len(seeds) // n):
            group = seeds[n * i:n * i + n]
            out[name][",".join(map(str, group))] = ari(np.hstack([embedding(s) for s in group]),
                                                       group[0])
            print(name, group, round(out[name][",".join(map(str, group))], 4), flush=True)
    summary = {}
    for name, values in out.items():
        v = np.array(list(values.values()))
        if len(v) < 2:  # too few seeds for this group size
            continue
        summary[name] = {"n": len(v), "mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                         "min": float(v.min()), "max": float(v.max()),
                         "below_target": int((v < target).sum())}
        print(name, {k: round(x, 4) for k, x in summary[name].items()})
    return {"plan": plan_path, "variant": variant, "seeds": seeds, "context_weight": weight,
            "target": target,
            "harmony": data.harmony, "n_domains": k_domains, "ari_mean_over_slices": out,
            "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["train", "score"])
    p.add_argument("plan")
    p.add_argument("--variant", default="default")
    p.add_argument("--tag", required=True)
    p.add_argument("--seeds", default="0-29")
    p.add_argument("--store", type=Path, default=Path("/tmp/spamask_ensembles"))
    p.add_argument("--name", default=None, help="result name (default model_ensembles_<tag>)")
    p.add_argument("--context-weight", type=float, default=None,
                   help="score: the context block's weight (default: run's; 0 = the caller on "
                        "the embedding alone, as before 2026-12-06)")
    p.add_argument("--target", type=float, default=0.58,
                   help="score: count the runs below this mean ARI (e.g. 0.65 for osmFISH)")
    args = p.parse_args()
    seeds = seed_list(args.seeds)
    if args.step == "train":
        train(args.plan, args.variant, args.tag, seeds, args.store)
    else:
        write_result(args.name or f"model_ensembles_{args.tag}",
                     score(args.plan, args.variant, args.tag, seeds, args.store,
                           args.context_weight, args.target))


if __name__ == "__main__":
    main()
