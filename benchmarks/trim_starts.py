"""Trimming the caller's starts: the medoid among all 120 GMM starts, or among the share with
the highest log-likelihood (``cluster(..., keep_starts=...)``), on stored embeddings.

The caller fits 120 seeded Gaussian mixtures and keeps the most typical one (the medoid by
ARI). A start stuck in a poor local optimum still votes in that choice; where two partitions
have near-equal support among the starts, such votes can decide. This script runs the
default caller on each stored embedding once per ``--keep`` value, with caller seed s and
s + ``--caller-offset`` (the context, Harmony and the training keep seed s), and reports the
harness's score (mean over slices of the per-slice ARI), how many calls end below
``--target``, whether the two caller seeds give the same domains, and how far the score moves
between them.

Prepares a plan's first dataset as the harness does, loads each seed's embedding stored by
``model_ensembles.py train`` and builds the caller's input as ``run`` does (``caller_input``).
``--n-components`` is the caller's: ``auto`` (the default since 2026-12-07: K and 2 K
joined, K kept only if the join loses in space and in expression), ``K`` (K components, the
default before), or a number M (M components, always joined; ``trim_starts_dlpfc_auto.json``
was made with the old ``--merge``, which was M = 2 K).

Usage: python benchmarks/trim_starts.py benchmarks/plans/osmfish_default.yaml --tag osmfish
           --seeds 0-19 --store /tmp/cstore --keep 1,0.75,0.5 --target 0.65
Result: benchmarks/results/trim_starts_<tag>.json (or --name)
"""

from __future__ import annotations

import time

import numpy as np

from _common import PlanData, seed_list, stored_embedding, stored_embedding_parser, write_result


def main() -> None:
    import spamask_integrate as si
    from sklearn.metrics import adjusted_rand_score

    ap = stored_embedding_parser(__doc__)
    ap.add_argument("--keep", default="1,0.75,0.5", help="keep_starts values, comma-separated")
    ap.add_argument("--caller-offset", type=int, default=1000)
    ap.add_argument("--target", type=float, required=True,
                    help="count the calls below this mean ARI")
    ap.add_argument("--n-components", default="auto",
                    help="the caller's n_components: auto (default), K, or a number M")
    args = ap.parse_args()
    keeps = [float(v) for v in args.keep.split(",")]
    data = PlanData(args.plan)
    adata, batch_key = data.adata, data.batch_key
    offsets = [0, args.caller_offset]
    word = args.n_components.lower()
    merge = {"n_components": {"auto": "auto", "k": None}.get(word) if word in ("auto", "k")
             else int(word)}

    rows: dict = {str(v): {} for v in keeps}
    for seed in seed_list(args.seeds):
        adata.obsm["X_spamask"] = stored_embedding(args.store, args.tag, seed)
        _, rep = si.caller_input(adata, batch_key, harmony=data.harmony, seed=seed)
        line = []
        for keep in keeps:
            calls = []
            for off in offsets:
                t0 = time.perf_counter()
                si.cluster(adata, data.k, "gmm", use_rep=rep, batch_key=batch_key,
                           seed=seed + off, keep_starts=keep, key_added="trimmed", **merge)
                info = adata.uns["spamask"]["cluster"]
                calls.append({"ari": data.score("trimmed"),
                              "domains": adata.obs["trimmed"].to_numpy().copy(),
                              "seconds": time.perf_counter() - t0,
                              "start_agreement": info["start_agreement"],
                              "kept_agreement": info["kept_agreement"],
                              "merge_kept": bool(info.get("merge_kept", False))})
            same = adjusted_rand_score(calls[0]["domains"], calls[1]["domains"])
            rows[str(keep)][str(seed)] = {
                "ari": calls[0]["ari"], "ari_other": calls[1]["ari"],
                "agreement_between_caller_seeds": float(same),
                "seconds": [c["seconds"] for c in calls],
                "start_agreement": calls[0]["start_agreement"],
                "kept_agreement": calls[0]["kept_agreement"],
                "merge_kept": [c["merge_kept"] for c in calls]}
            line.append(f"keep {keep:g}: {calls[0]['ari']:.4f} / {calls[1]['ari']:.4f}"
                        f"{' same' if same > 1 - 1e-9 else f' (agree {same:.3f})'}")
        print(f"seed {seed}", "; ".join(line), flush=True)

    base = np.array([r["ari"] for r in rows[str(keeps[0])].values()])
    summary = {}
    for keep in keeps:
        r = list(rows[str(keep)].values())
        a = np.array([x["ari"] for x in r])
        b = np.array([x["ari_other"] for x in r])
        both = np.concatenate([a, b])
        same = np.array([x["agreement_between_caller_seeds"] > 1 - 1e-9 for x in r])
        moved = np.abs(a - b)
        d = a - base
        summary[str(keep)] = {
            "mean": float(a.mean()), "sd": float(a.std(ddof=1)),
            "mean_other": float(b.mean()), "sd_other": float(b.std(ddof=1)),
            "below_target": int((both < args.target).sum()), "calls": int(both.size),
            "worst": float(both.min()), "same_domains": int(same.sum()), "of": len(r),
            "moved_mean": float(moved.mean()), "moved_max": float(moved.max()),
            "paired_mean": float(d.mean()), "paired_sd": float(d.std(ddof=1)),
            "up": int((d > 1e-9).sum()), "down": int((d < -1e-9).sum()),
            "seconds_median": float(np.median([x["seconds"][0] for x in r])),
            "merge_kept": int(sum(x["merge_kept"][0] for x in r))}
        s = summary[str(keep)]
        print(f"keep {keep:g}: {s['mean']:.4f} ± {s['sd']:.4f} (caller seed +{args.caller_offset}: "
              f"{s['mean_other']:.4f} ± {s['sd_other']:.4f}); below {args.target:g}: "
              f"{s['below_target']} of {s['calls']} calls, worst {s['worst']:.3f}; the same "
              f"domains for both caller seeds on {s['same_domains']} of {s['of']}; moved "
              f"{s['moved_mean']:.3f} / {s['moved_max']:.3f}; against keep {keeps[0]:g} "
              f"{s['paired_mean']:+.4f} ± {s['paired_sd']:.4f} ({s['up']} up, {s['down']} down); "
              f"joined components kept on {s['merge_kept']} of {s['of']}")
    write_result(args.name or f"trim_starts_{args.tag}",
                 {"plan": args.plan, "seeds": args.seeds, "keep": keeps,
                  "n_components": merge["n_components"],
                  "caller_offset": args.caller_offset, "target": args.target,
                  "summary": summary, "seeds_rows": rows})


if __name__ == "__main__":
    main()
