"""Print the README's Markdown tables for a benchmark plan's results.

Default: one row per setting, with per-slice ARI (mean over seeds), then mean per-slice ARI
(mean ± sd over seeds, and the worst and best seed) and NMI. With ``--ablations``: one small table per ablated setting
(variants named ``<setting>_<value>``, e.g. ``mask_rate_0.3``), each beside the default.

With ``--runs``: the whole-``run`` stage table from ``results/run_*.json``
(``benchmarks/run_1m.py``), one column per size.

Usage: python benchmarks/tables.py benchmarks/results/dlpfc
       python benchmarks/tables.py benchmarks/results/ablations --ablations
       python benchmarks/tables.py benchmarks/results --runs
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd

NAMES = {"spamask": "SpaMask (defaults)", "spamask_reference": "SpaMask, reference masking",
         "spamask_per_slice": "SpaMask per slice", "pca": "PCA",
         "smoothed_pca": "smoothed PCA", "banksy_0.2": "BANKSY λ = 0.2",
         "banksy_0.8": "BANKSY λ = 0.8"}
ORDER = list(NAMES)
#: headings of the ablation tables, by variant-name prefix; the default values are those of
#: SpamaskConfig, the 5,000-HVG PCA-200 input of ``preprocess`` and k = 12 of ``build_graph``
SETTINGS = {"mask_rate": "node-mask rate (default 0.5)",
            "edge_drop": "edge-drop rate (default 0.2)",
            "lambda": "lambda, weight of the edge loss (default 2)",
            "hvg": "input (default PCA-200 of the z-scored HVGs)",
            "k": "graph k (default 12)"}


def _natural(name: str) -> tuple:
    """default first, then by name with numbers compared as numbers (k_6 before k_21)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", name)
    return (name != "default", [(0, float(p), "") if re.fullmatch(r"\d+(?:\.\d+)?", p)
                                else (1, 0.0, p) for p in parts if p])


def _sd(values: pd.Series) -> str:
    return "" if len(values) < 2 else f" ± {values.std():.3f}"


def ablation_tables(per_seed: pd.DataFrame) -> None:
    """One table per ablated setting: the default and each value, mean ± sd and per seed."""
    variants = sorted(per_seed.index.get_level_values("variant").unique(), key=_natural)
    groups: dict[str, list[str]] = {}
    for v in variants:
        if v != "default":
            groups.setdefault(v.rsplit("_", 1)[0], []).append(v)
    for group, members in groups.items():
        print(f"\n**{SETTINGS.get(group, group)}**\n")
        print("| variant | mean ARI | mean NMI | ARI per seed |")
        print("| --- | --- | --- | --- |")
        for v in ["default"] + members:
            rows = per_seed.xs(v, level="variant")
            seeds = " / ".join(f"{a:.3f}" for a in rows["ARI"])
            print(f"| {v} | {rows['ARI'].mean():.3f}{_sd(rows['ARI'])} | "
                  f"{rows['NMI'].mean():.3f} | {seeds} |")


def run_table(folder: Path) -> None:
    """Seconds per stage of the whole ``run`` (medians over repeats), one column per result."""
    runs = [json.loads(p.read_text()) for p in folder.glob("run_[0-9]*.json")]
    runs.sort(key=lambda r: (r["n_spots"], not r.get("scib", True)))
    stages = list(dict.fromkeys(s for r in runs for s in r["seconds"] if s != "read"))
    head = [f"{r['n_spots']:,}" + ("" if r.get("scib", True) else " (no scib)") for r in runs]
    print("| stage | " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * len(runs))
    for stage in stages:
        cells = [f"{r['seconds'][stage]:.1f}" if stage in r["seconds"] else "" for r in runs]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{r['total_seconds']:.1f}**" for r in runs) + " |")
    share = [f"{r['slowest_stage']} {100 * r['slowest_share']:.0f}%" for r in runs]
    print("| slowest stage | " + " | ".join(share) + " |")
    print("| peak RSS (GB) | " + " | ".join(f"{r['peak_rss_gb']:.2f}" for r in runs) + " |")
    print("| runs | " + " | ".join(str(r.get("repeats", 1)) for r in runs) + " |")


def tiled_table(folder: Path) -> None:
    """The default CLI run on the four DLPFC slices (run_dlpfc.json) and on tiled DLPFC data
    (run_tiled_*.json): medians over repeats."""
    runs = sorted((json.loads(p.read_text()) for p in folder.glob("run_tiled_*.json")),
                  key=lambda r: r["n_spots"])
    names = [f"{r['n_spots']:,} tiled ({r['n_slices']} slices)" for r in runs]
    if (folder / "run_dlpfc.json").exists():
        runs.insert(0, json.loads((folder / "run_dlpfc.json").read_text()))
        names.insert(0, "4 DLPFC slices (11,380)")
    stages = list(dict.fromkeys(s for r in runs for s in r["seconds"]))
    print("| | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(runs))
    for stage in stages:
        print(f"| {stage} | " + " | ".join(f"{r['seconds'].get(stage, float('nan')):.0f}"
                                           for r in runs) + " |")
    print("| **total (s)** | " + " | ".join(
        f"**{r['total_seconds']:.0f}** ({r['total_seconds'] / 60:.1f} min)" for r in runs) + " |")
    print("| peak RSS (GB) | " + " | ".join(f"{r['peak_rss_gb']:.1f}" for r in runs) + " |")
    for key, name in (("ari_mean_slice", "ARI, mean over slices"), ("ari_pooled", "ARI, pooled"),
                      ("nmi_mean_slice", "NMI, mean over slices"), ("nmi_pooled", "NMI, pooled")):
        print(f"| {name} | " + " | ".join(f"{r[key]:.3f}" for r in runs) + " |")
    print("| scib sample (spots) | " + " | ".join(
        f"{r['runs'][0].get('scib_n_spots') or 0:,}" for r in runs) + " |")
    print("| same-seed repeat: ARI between domains | " + " | ".join(
        ", ".join(f"{x['ari_vs_first_repeat']:.3f}" for x in r["runs"]
                  if "ari_vs_first_repeat" in x) or "—" for r in runs) + " |")
    print("| runs (median of) | " + " | ".join(str(r["repeats"]) for r in runs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("--ablations", action="store_true",
                        help="one small table per ablated setting")
    parser.add_argument("--runs", action="store_true",
                        help="the whole-run stage table from RESULTS/run_*.json")
    parser.add_argument("--tiled", action="store_true",
                        help="the default-run table from RESULTS/run_tiled_*.json")
    args = parser.parse_args()
    if args.tiled:
        tiled_table(args.results)
        return
    if args.runs:
        run_table(args.results)
        return
    r = pd.read_csv(args.results / "results.csv", keep_default_na=False, na_values=[""])
    if "variant" not in r:
        r["variant"] = "default"
    r = r[(r.status == "ok") & (r.kind == "domain") & (r.scope != "all")
          & r.metric.isin(["ARI", "NMI"])]
    setting = ["method", "variant", "harmony"]
    slices = sorted(r.scope.unique())
    per_slice = r[r.metric == "ARI"].groupby(setting + ["scope"]).value.mean().unstack("scope")
    per_seed = r.groupby(setting + ["seed", "metric"]).value.mean().unstack("metric")
    if args.ablations:
        ablation_tables(per_seed)
        return
    stats = per_seed.groupby(level=setting).agg(["mean", "std", "count", "min", "max"])
    variants = sorted(r.variant.unique(), key=_natural)
    head = (["method", "variant", "Harmony"] + slices
            + ["mean ARI", "worst / best seed", "mean NMI", "seeds"])
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    keys = sorted(stats.index, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99,
                                              variants.index(k[1]), k[2]))
    for key in keys:
        s = stats.loc[key]
        cells = [NAMES.get(key[0], key[0]), key[1], "yes" if key[2] else "no"]
        cells += [f"{per_slice.loc[key, c]:.3f}" for c in slices]
        sd = "" if s[("ARI", "count")] < 2 else f" ± {s[('ARI', 'std')]:.3f}"
        cells += [f"{s[('ARI', 'mean')]:.3f}{sd}",
                  f"{s[('ARI', 'min')]:.3f} / {s[('ARI', 'max')]:.3f}",
                  f"{s[('NMI', 'mean')]:.3f}", str(int(s[("ARI", "count")]))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
