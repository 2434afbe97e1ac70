"""Does the domain caller give the same domains whatever its own seed? Run by hand.

On embeddings already trained and stored by ``model_ensembles.py train`` (``--store``:
meta_<tag>.npz with the slices, labels and coordinates, <tag>_<seed>.npz with each seed's
embedding), the default caller (Harmony first with ``--harmony``, K from ``--k``) runs twice
per embedding, with caller seeds s and s + 1000, and with each ``n_starts`` of ``--starts``
(default 20,60). Per embedding: the mean over slices of the per-slice ARI of each call, the
ARI between the two calls' domains (1.0: the same partition), and the starts' mean agreement.

Usage: python benchmarks/caller_seeds.py --tag osmfish --k 11 --seeds 0-25 --store /tmp/embs
       python benchmarks/caller_seeds.py --tag dlpfc --k 7 --harmony --seeds 0-14 --store /tmp/embs
Result: benchmarks/results/caller_seeds_<tag>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import StoredRun, seed_list, write_result

def main() -> None:
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score as ari

    import spamask_integrate as si

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--harmony", action="store_true")
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--store", type=Path, default=Path("/tmp/spamask_ensembles"))
    p.add_argument("--starts", default="20,60", help="n_starts values, comma-separated")
    p.add_argument("--name", default=None, help="result name (default caller_seeds_<tag>)")
    args = p.parse_args()
    starts = [int(n) for n in args.starts.split(",")]

    run = StoredRun(args.store, args.tag)  # the default graph: the caller's prior

    rows = []
    for seed in seed_list(args.seeds):
        a = run.base.copy()
        a.obsm["X"] = run.embedding(seed)
        rep = "X"
        if args.harmony:
            si.integrate(a, "slice", use_rep="X", key_added="X_harmony", seed=seed)
            rep = "X_harmony"
        row = {"seed": seed}
        for n in starts:
            calls = []
            for caller_seed in (seed, seed + 1000):
                si.cluster(a, args.k, "gmm", use_rep=rep, batch_key="slice", seed=caller_seed,
                           n_starts=n)
                calls.append(a.obs["domain"].astype(str).to_numpy())
                row[f"start_agreement_{n}"] = a.uns["spamask"]["cluster"]["start_agreement"]
            row[f"ari_{n}"], row[f"ari_{n}_other_seed"] = run.score(calls[0]), run.score(calls[1])
            row[f"same_{n}"] = float(ari(calls[0], calls[1]))
        rows.append(row)
        print({k: round(v, 3) for k, v in row.items()}, flush=True)
    df = pd.DataFrame(rows)
    summary = {}
    for n in starts:
        moved = (df[f"ari_{n}"] - df[f"ari_{n}_other_seed"]).abs()
        summary[n] = {"ari_mean": float(df[f"ari_{n}"].mean()),
                      "ari_mean_other_seed": float(df[f"ari_{n}_other_seed"].mean()),
                      "identical_domains": int((df[f"same_{n}"] > 0.9999).sum()),
                      "embeddings": len(df), "same_min": float(df[f"same_{n}"].min()),
                      "same_median": float(df[f"same_{n}"].median()),
                      "ari_moved_mean": float(moved.mean()), "ari_moved_max": float(moved.max())}
        print(n, {k: round(v, 3) for k, v in summary[n].items()})
    write_result(args.name or f"caller_seeds_{args.tag}",
                 {"tag": args.tag, "k": args.k, "harmony": args.harmony, "rows": rows,
                  "summary": summary})


if __name__ == "__main__":
    main()
