"""Print the README's Markdown table for a benchmark plan's results: per-slice ARI (mean over
seeds), then mean per-slice ARI and NMI (mean ± sd over seeds), one row per setting.

Usage: python benchmarks/tables.py benchmarks/results/dlpfc [--by-variant]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

NAMES = {"spamask": "SpaMask joint", "spamask_reference": "SpaMask, reference masking",
         "spamask_per_slice": "SpaMask per slice", "pca": "PCA + GMM",
         "smoothed_pca": "smoothed PCA + GMM"}
ORDER = list(NAMES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    r = pd.read_csv(args.results / "results.csv", keep_default_na=False, na_values=[""])
    if "variant" not in r:
        r["variant"] = "default"
    r = r[(r.status == "ok") & (r.kind == "domain") & (r.scope != "all")
          & r.metric.isin(["ARI", "NMI"])]
    setting = ["method", "variant", "harmony"]
    slices = sorted(r.scope.unique())
    per_slice = r[r.metric == "ARI"].groupby(setting + ["scope"]).value.mean().unstack("scope")
    per_seed = r.groupby(setting + ["seed", "metric"]).value.mean().unstack("metric")
    stats = per_seed.groupby(level=setting).agg(["mean", "std", "count"])
    variants = list(dict.fromkeys(r.variant))
    head = ["method", "variant", "Harmony"] + slices + ["mean ARI", "mean NMI", "seeds"]
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
                  f"{s[('NMI', 'mean')]:.3f}", str(int(s[("ARI", "count")]))]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
