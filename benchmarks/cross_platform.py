"""One tissue on two platforms: do the domains keep their names across platforms? Run by hand.

The domain-calling issue reports a held-out pair of one tissue measured on two imaging
platforms where, in one joint run, a layer got a different domain on each platform. The
shared data hold no such pair, so this script makes a stand-in from the labelled osmFISH
section (mouse somatosensory cortex, 11 regions): its cells are split at random into two
halves of the same tissue (seeded), and the second half is re-measured as by another
platform:

- each gene has its own capture efficiency (log-normal, sd ``--efficiency-sd``, default 0.5);
- the response is not linear: the expected count is ``efficiency * count ** --response``
  (default 0.8, a saturating detector), scaled so the half has ``--depth`` (default 0.5)
  of the first half's molecules per cell, and drawn again from a Poisson law;
- the coordinates are in other units and turned: rotated 90 degrees and scaled by 0.3;
- with ``--cover F`` below 1, the second platform images only part of the tissue: the share
  F of the section along its long axis (y) from the pial side, so the white matter, the
  hippocampus, the ventricle and the caudoputamen are scarce or absent there. The regions
  then differ in their share between the platforms, which is what a correction across
  batches (Harmony) can mistake for a platform effect.

Both halves keep the region labels. ``make`` writes the two .h5ad files and a benchmark plan
(every method the harness has, Harmony over the two platforms, the default caller, K = 11);
``spamask-integrate benchmark`` runs it;
``summary`` prints, for each method, the per-platform ARIs, their mean, the **pooled ARI**
over both (lower than the mean when a region is called differently on each platform), the
gap between the two, and SpaMask's lead over the method, paired by seed.

``make --as-is`` leaves the second half as measured: the control, one platform split in two.

``screen`` asks where SpaMask loses on such a section: on the embeddings that
``model_ensembles.py train`` stored for a plan (``--tag``, ``--store``), it runs the caller on
the embedding alone and beside the input's context (weights 0, 0.5, 1), each with K
components and with the default checked join, and the same two callers on smoothed PCA.

``check`` asks what the default's check between the K components and the 2 K join chose, on
the same stored embeddings: for SpaMask's input and smoothed PCA's, the score of K components,
of the join always and of the default, and the check's two counts (the change, joined minus
K, in pair coherence and in the Fisher ratio in ``obsm["X_pca"]``).

Usage: python benchmarks/cross_platform.py make DIR [--split-seed 0] [--as-is] [--cover 1]
       spamask-integrate benchmark DIR/plan.yaml -o benchmarks/results/cross_platform
       python benchmarks/cross_platform.py summary benchmarks/results/cross_platform
       python benchmarks/model_ensembles.py train DIR/plan.yaml --tag half --seeds 0-9 --store S
       python benchmarks/cross_platform.py screen DIR/plan.yaml --tag half --seeds 0-9 --store S
       python benchmarks/cross_platform.py check DIR/plan.yaml --tag half --seeds 0-9 --store S
Result of screen: benchmarks/results/cross_platform_screen_<tag>.json; of check:
cross_platform_check_<tag>.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from _common import SHARED, PlanData, seed_list, stored_embedding, write_result
from spamask_integrate.io import atomic_write

OSMFISH = SHARED / "osmfish_sscortex" / "osmFISH_all_cells.h5ad"
PLAN = """# One tissue, two platforms (a stand-in made by benchmarks/cross_platform.py make: osmFISH's
# cells split at random into two halves, {how}).
# Harmony over the platforms; the default caller; K = 11.
datasets:
  - name: osmfish_two_platforms
    sources: [{a}, {b}]
    label_key: Region
    drop_labels: [Excluded]
    n_domains: 11
settings:
  methods: [spamask, pca, smoothed_pca, banksy_0.2, banksy_0.8]
  harmony: [true]
  cluster: [gmm]
  seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""


def second_platform(half: ad.AnnData, depth_ref: float, *, efficiency_sd: float,
                    response: float, depth: float, rng: np.random.Generator) -> ad.AnnData:
    """``half`` measured again as by another platform (see the module's docstring)."""
    counts = half.X.toarray() if sp.issparse(half.X) else np.asarray(half.X)
    efficiency = np.exp(rng.normal(0.0, efficiency_sd, counts.shape[1]))
    expected = efficiency * counts.astype(np.float64) ** response
    expected *= depth * depth_ref / expected.sum(axis=1).mean()
    out = half.copy()
    out.X = sp.csr_matrix(rng.poisson(expected).astype(np.int32))
    xy = np.asarray(half.obsm["spatial"], dtype=np.float64)
    out.obsm["spatial"] = 0.3 * np.column_stack([-xy[:, 1], xy[:, 0]])
    out.uns["source"] = (f"{OSMFISH.name}: the second half re-measured by "
                         f"benchmarks/cross_platform.py (efficiency sd {efficiency_sd}, "
                         f"response {response}, depth {depth})")
    return out


def make(folder: Path, split_seed: int, efficiency_sd: float, response: float,
         depth: float, as_is: bool = False, cover: float = 1.0) -> None:
    if not 0.0 < cover <= 1.0:
        raise SystemExit(f"--cover {cover}: must be above 0 and at most 1")
    full = ad.read_h5ad(OSMFISH)
    rng = np.random.default_rng(split_seed)
    second = rng.random(full.n_obs) < 0.5
    kept = second.copy()  # the cells the second platform measures
    if cover < 1.0:  # it sees only the pial share `cover` of the section
        y = np.asarray(full.obsm["spatial"], dtype=np.float64)[:, 1]
        edge = np.quantile(y, 1.0 - cover)
        kept &= y >= edge
        print(f"--cover {cover}: the second platform keeps {kept.sum()} of its "
              f"{second.sum()} cells (y above {edge:.0f})")
    a = full[~second].copy()
    a.uns["source"] = f"{OSMFISH.name}: the first half of the cells (split seed {split_seed})"
    depth_ref = float(np.asarray(a.X.sum(axis=1)).mean())
    if as_is:  # the control: two halves of one platform
        b = full[kept].copy()
        b.uns["source"] = f"{OSMFISH.name}: the second half of the cells, as measured"
    else:
        b = second_platform(full[kept].copy(), depth_ref, efficiency_sd=efficiency_sd,
                            response=response, depth=depth, rng=rng)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "platform_a.h5ad", folder / "platform_b.h5ad"]
    for half, path in zip([a, b], paths):
        with atomic_write(path) as tmp:  # never a half-written file
            half.write_h5ad(tmp)
    how = ("the control: both as measured" if as_is else
           f"the second re-measured with per-gene efficiency sd {efficiency_sd}, response "
           f"exponent {response}, depth {depth},\n# coordinates turned and rescaled")
    if cover < 1.0:
        how += f",\n# the second platform covering only the pial {cover:g} of the section"
    with atomic_write(folder / "plan.yaml") as tmp:
        tmp.write_text(PLAN.format(a=paths[0].resolve(), b=paths[1].resolve(), how=how))
    print(f"wrote {paths[0]} ({a.n_obs} cells), {paths[1]} ({b.n_obs} cells, "
          f"{np.asarray(b.X.sum(axis=1)).mean():.0f} molecules a cell against "
          f"{depth_ref:.0f}) and {folder / 'plan.yaml'}")


def summary(results: Path) -> None:
    """Per method, mean ± sd over seeds: the ARI on each platform, their mean, the pooled ARI
    and the gap between the two; and SpaMask's lead over each method, paired by seed."""
    table = pd.read_csv(results / "results.csv")
    ari = table[(table.metric == "ARI") & (table.kind == "domain") & (table.status == "ok")]
    wide = ari.pivot_table(index=["method", "seed"], columns="scope", values="value")
    slices = [c for c in wide.columns if c != "all"]
    wide["mean"] = wide[slices].mean(axis=1)
    wide["gap"] = wide["mean"] - wide["all"]
    cols = slices + ["mean", "all", "gap"]
    rows = []
    for method, one in wide.groupby(level="method"):
        row = {c: f"{one[c].mean():.3f} ± {one[c].std():.3f}" for c in cols}
        row["seeds"] = len(one)
        if "spamask" in wide.index.get_level_values("method") and method != "spamask":
            lead = (wide.loc["spamask", "mean"] - one.droplevel("method")["mean"]).dropna()
            row["SpaMask ahead by"] = (f"{lead.mean():+.3f} ± {lead.std():.3f}, on "
                                       f"{int((lead > 0).sum())} of {len(lead)}")
        rows.append(pd.Series(row, name=method))
    out = pd.DataFrame(rows).rename(columns={"all": "pooled", "mean": "mean of platforms"})
    out = out.fillna("")
    print("| method | " + " | ".join(out.columns) + " |")
    print("| --- |" + " ---: |" * len(out.columns))
    for method, row in out.iterrows():
        print(f"| {method} | " + " | ".join(str(v) for v in row) + " |")


def screen(plan: str, tag: str, seeds: list[int], store: Path) -> None:
    import spamask_integrate as si

    data = PlanData(plan)
    adata, batch_key, k = data.adata, data.batch_key, data.k
    scores: dict = {}
    for seed in seeds:
        adata.obsm["X_spamask"] = stored_embedding(store, tag, seed)
        inputs = {}
        for weight in (0.0, 0.5, 1.0):  # each weight's input kept under a key of its own
            _, rep = si.caller_input(adata, batch_key, weight=weight, harmony=data.harmony,
                                     seed=seed)
            adata.obsm[f"input_{weight:g}"] = adata.obsm[rep]
            inputs[f"spamask_weight_{weight:g}"] = f"input_{weight:g}"
        inputs["smoothed_pca"] = data.smoothed_pca_input(seed)
        for name, rep in inputs.items():
            for rule, n_components in (("K", None), ("checked_join", "auto")):
                si.cluster(adata, k, "gmm", use_rep=rep, batch_key=batch_key, seed=seed,
                           n_components=n_components, key_added="screened")
                scores.setdefault(f"{name} / {rule}", {})[str(seed)] = data.score("screened")
        print(f"seed {seed}: " + ", ".join(f"{key} {v[str(seed)]:.3f}"
                                         for key, v in scores.items()), flush=True)
    summary = {key: {"mean": float(np.mean(list(v.values()))),
                     "sd": float(np.std(list(v.values()), ddof=1)),
                     "min": float(np.min(list(v.values())))} for key, v in scores.items()}
    for key, v in summary.items():
        print(f"{key}: {v['mean']:.3f} ± {v['sd']:.3f}, worst {v['min']:.3f}")
    write_result(f"cross_platform_screen_{tag}", {"plan": plan, "seeds": seeds,
                                                  "scores": scores, "summary": summary})


def check(plan: str, tag: str, seeds: list[int], store: Path, name: str | None = None) -> None:
    import spamask_integrate as si
    from spamask_integrate.cluster import join_kept, same_slice_neighbours

    data = PlanData(plan)
    adata, batch_key, k = data.adata, data.batch_key, data.k
    adj = same_slice_neighbours(adata, batch_key)  # the check's graph, in the AnnData's order
    rows = []
    for seed in seeds:
        inputs = data.caller_inputs(stored_embedding(store, tag, seed), seed)
        for method, rep in inputs.items():
            row = {"seed": seed, "method": method}
            labels = {}
            # the default fits these two (same seed) and keeps one by `join_kept`
            for rule, n_components in (("K", None), ("join", 2 * k)):
                si.cluster(adata, k, "gmm", use_rep=rep, batch_key=batch_key, seed=seed,
                           n_components=n_components, key_added="checked")
                row[rule] = data.score("checked")
                labels[rule] = adata.obs["checked"].cat.codes.to_numpy()
            kept, fit = join_kept(adj, adata.obsm["X_pca"], labels["K"], labels["join"], k)
            row.update(default=row["join"] if kept else row["K"], join_kept=bool(kept),
                       **{f"{name}_change": float(pair[1] - pair[0])
                          for name, pair in fit.items()})
            rows.append(row)
            print(f"seed {seed}, {method}: K {row['K']:.3f}, join {row['join']:.3f}, default "
                  f"{row['default']:.3f} (join kept: {row['join_kept']}; model score "
                  f"{row['score_change']:+.4f}, log-likelihood {row['loglik_change']:+.4f}, "
                  f"coherence {row['coherence_change']:+.4f}, Fisher ratio "
                  f"{row['distinct_change']:+.3f})", flush=True)
    table = pd.DataFrame(rows)
    summary = {}
    for method, one in table.groupby("method"):
        summary[method] = {rule: {"mean": float(one[rule].mean()), "sd": float(one[rule].std())}
                           for rule in ("K", "join", "default")}
        summary[method].update(
            join_kept=int(one["join_kept"].sum()),
            join_less_coherent=int((one["coherence_change"] < 0).sum()),
            space_alone=float(np.where(one["coherence_change"] > 0, one["join"],
                                       one["K"]).mean()),
            # the check until 2026-12-07, night: the join kept if better on either count
            either_count=float(np.where((one["coherence_change"] > 0)
                                        | (one["distinct_change"] > 0), one["join"],
                                        one["K"]).mean()))
        print(f"{method}: " + ", ".join(f"{rule} {v['mean']:.3f} ± {v['sd']:.3f}" for rule, v
                                        in summary[method].items() if isinstance(v, dict))
              + f"; join kept on {summary[method]['join_kept']} of {len(one)}, less coherent "
              f"on {summary[method]['join_less_coherent']}; the rule of space alone would "
              f"score {summary[method]['space_alone']:.3f}, the check before (either "
              f"count) {summary[method]['either_count']:.3f}")
    write_result(name or f"cross_platform_check_{tag}",
                 {"plan": plan, "seeds": seeds, "rows": rows, "summary": summary})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--split-seed", type=int, default=0)
    m.add_argument("--efficiency-sd", type=float, default=0.5)
    m.add_argument("--response", type=float, default=0.8)
    m.add_argument("--depth", type=float, default=0.5)
    m.add_argument("--as-is", action="store_true",
                   help="the control: leave the second half as measured (one platform)")
    m.add_argument("--cover", type=float, default=1.0,
                   help="share of the section (along y, from the pial side) that the second "
                        "platform covers; 1: all of it")
    s = sub.add_parser("summary")
    s.add_argument("results", type=Path)
    for name in ("screen", "check"):  # both read the embeddings stored for a plan
        c = sub.add_parser(name)
        c.add_argument("plan")
        c.add_argument("--tag", required=True)
        c.add_argument("--seeds", default="0-9")
        c.add_argument("--store", type=Path, required=True)
    sub.choices["check"].add_argument("--name", default=None,
                                      help="result file (default cross_platform_check_TAG)")
    args = parser.parse_args()
    if args.what == "make":
        make(args.folder, args.split_seed, args.efficiency_sd, args.response, args.depth,
             args.as_is, args.cover)
    elif args.what == "summary":
        summary(args.results)
    elif args.what == "screen":
        screen(args.plan, args.tag, seed_list(args.seeds), args.store)
    else:
        check(args.plan, args.tag, seed_list(args.seeds), args.store, args.name)


if __name__ == "__main__":
    main()
