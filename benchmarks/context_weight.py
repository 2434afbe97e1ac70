"""What the domain caller sees: the SpaMask embedding alone, or beside the spatial context of
the model input at several weights (``context_embedding``), on stored embeddings.

Prepares a plan's first dataset as the benchmark harness does (the same spot names, so the
caller's sample is the harness's), loads each seed's embedding stored by
``model_ensembles.py train`` and runs what ``run`` runs after training: the context block,
Harmony when the plan has it (``caller_input``, as ``run``), the default caller. Weight 0 is
the embedding alone (the caller's input before the context). The score is the harness's:
the mean over slices of the per-slice ARI of ``evaluate``.

``--caller-offset N`` also runs the caller with seed s + N on the same input (the context,
Harmony and the training keep seed s) and reports whether the two partitions are the same:
does the answer depend on the caller's own seed? ``--n-starts N`` gives the caller N GMM
starts instead of the default.

Usage: python benchmarks/context_weight.py benchmarks/plans/osmfish_default.yaml
           --tag osmfish --seeds 0-19 --store /tmp/cstore --weights 0,0.25,0.5,1
Result: benchmarks/results/context_weight_<tag>.json (or --name)
"""

from __future__ import annotations


import numpy as np

from _common import PlanData, seed_list, stored_embedding, stored_embedding_parser, write_result


def main() -> None:
    import spamask_integrate as si
    from sklearn.metrics import adjusted_rand_score

    ap = stored_embedding_parser(__doc__)
    ap.add_argument("--weights", default="0,0.5")
    ap.add_argument("--caller-offset", type=int, default=0)
    ap.add_argument("--n-starts", type=int, default=None,
                    help="the caller's GMM starts (default: the library's default)")
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    starts = {} if args.n_starts is None else {"n_starts": args.n_starts}
    data = PlanData(args.plan)
    ds, adata, batch_key, harmony = data.ds, data.adata, data.batch_key, data.harmony
    score = data.score  # the harness's score: mean over slices of the per-slice ARI

    out: dict = {str(w): {} for w in weights}
    other: dict = {str(w): {} for w in weights}  # with the caller seed + offset
    for seed in seed_list(args.seeds):
        adata.obsm["X_spamask"] = stored_embedding(args.store, args.tag, seed)
        row = []
        for w in weights:
            _, rep = si.caller_input(adata, batch_key, weight=w, harmony=harmony, seed=seed)
            si.cluster(adata, int(ds.get("n_domains", 7)), "gmm", use_rep=rep,
                       batch_key=batch_key, seed=seed, **starts)
            domains = adata.obs["domain"].to_numpy()
            out[str(w)][str(seed)] = score("domain")
            row.append(f"{w:g}: {out[str(w)][str(seed)]:.4f}")
            if args.caller_offset:
                si.cluster(adata, int(ds.get("n_domains", 7)), "gmm", use_rep=rep,
                           batch_key=batch_key, seed=seed + args.caller_offset,
                           key_added="domain_other", **starts)
                again = adata.obs["domain_other"].to_numpy()
                other[str(w)][str(seed)] = {"ari": score("domain_other"),
                                            "agreement": adjusted_rand_score(domains, again)}
                row.append(f"(caller seed +{args.caller_offset}: "
                           f"{other[str(w)][str(seed)]['ari']:.4f}, "
                           f"agreement {other[str(w)][str(seed)]['agreement']:.3f})")
        print(f"seed {seed}", ", ".join(row), flush=True)
    base = np.array(list(out[str(weights[0])].values()))
    summary = {}
    for w in weights:
        v = np.array(list(out[str(w)].values()))
        d = v - base
        summary[str(w)] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1)),
                           "min": float(v.min()), "paired_mean": float(d.mean()),
                           "paired_sd": float(d.std(ddof=1)), "up": int((d > 0).sum()),
                           "down": int((d < 0).sum())}
        print(f"weight {w:g}: {v.mean():.3f} ± {v.std(ddof=1):.3f}, worst {v.min():.3f}; "
              f"against weight {weights[0]:g} {d.mean():+.3f} ± {d.std(ddof=1):.3f} "
              f"({(d > 0).sum()} up, {(d < 0).sum()} down)")
        if args.caller_offset:
            agree = np.array([o["agreement"] for o in other[str(w)].values()])
            moved = np.abs(np.array([o["ari"] for o in other[str(w)].values()]) - v)
            summary[str(w)].update(same_domains=int((agree > 1 - 1e-9).sum()),
                                   median_agreement=float(np.median(agree)),
                                   moved_mean=float(moved.mean()), moved_max=float(moved.max()))
            print(f"  caller seed + {args.caller_offset}: the same domains on "
                  f"{(agree > 1 - 1e-9).sum()} of {len(agree)}, median agreement "
                  f"{np.median(agree):.3f}; ARI moved {moved.mean():.3f} on average, "
                  f"{moved.max():.3f} at most")
    write_result(f"context_weight_{args.tag}" if args.name is None else args.name,
                 {"plan": args.plan, "seeds": args.seeds, "weights": weights,
                  "caller_offset": args.caller_offset, "n_starts": args.n_starts,
                  "scores": out,
                  "other_caller_seed": other if args.caller_offset else {},
                  "summary": summary})


if __name__ == "__main__":
    main()
