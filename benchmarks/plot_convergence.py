"""Plot and table of benchmarks/results/convergence_*.json: ARI against the training budget.

One line per study (a size, or the four original DLPFC slices); a study over several seeds
is drawn as the mean with its sd as error bars. The x axis counts spot visits (spots x
epochs), the budget's common unit: a full-graph epoch visits every spot once, a tile-subgraph
step visits up to 16,384. The table gives, per budget, ARI (mean over slices) as mean ± sd
over seeds and the paired difference from the default budget of each seed.

Usage: python benchmarks/plot_convergence.py   ->  benchmarks/results/convergence.png
"""

from __future__ import annotations

import json

import numpy as np

from _common import RESULTS


def studies() -> list[dict]:
    out = []
    for path in sorted(RESULTS.glob("convergence_*.json")):
        run = json.loads(path.read_text())
        runs = run.get("runs") or [{"seed": run["seed"], "points": run["points"]}]
        epochs = [p["epochs"] for p in runs[0]["points"]]
        ari = np.array([[p["ari_mean_slice"] for p in r["points"]] for r in runs])
        pooled = np.array([[p["ari_pooled"] for p in r["points"]] for r in runs])
        default = [p["default_budget"] for p in runs[0]["points"]].index(True)
        out.append({"name": path.stem, "n_spots": run["n_spots"], "mode": run["mode"],
                    "data": run.get("data", "tiled DLPFC"), "seeds": [r["seed"] for r in runs],
                    "epochs": epochs, "visits": [p["spot_visits"] for p in runs[0]["points"]],
                    "steps": [p["steps"] for p in runs[0]["points"]], "ari": ari,
                    "pooled": pooled, "default": default})
    return out


def table(s: dict) -> str:
    lines = [f"{s['name']}: {s['n_spots']:,} spots, {s['data']}, {s['mode']}, "
             f"seeds {s['seeds']}",
             "| epochs | steps | spot visits | ARI mean over slices (mean ± sd over seeds) "
             f"| paired difference from {s['epochs'][s['default']]} epochs (mean ± sd) "
             "| pooled ARI |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, e in enumerate(s["epochs"]):
        diff = s["ari"][:, i] - s["ari"][:, s["default"]]
        mark = " (default then)" if i == s["default"] else ""
        lines.append(f"| {e}{mark} | {s['steps'][i]} | {s['visits'][i] / 1e6:.2f} M | "
                     f"{s['ari'][:, i].mean():.3f} ± {s['ari'][:, i].std(ddof=1) if len(diff) > 1 else 0:.3f} | "
                     f"{diff.mean():+.3f} ± {diff.std(ddof=1) if len(diff) > 1 else 0:.3f} | "
                     f"{s['pooled'][:, i].mean():.3f} |")
    return "\n".join(lines)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for s in studies():
        print(table(s), "\n")
        x = np.asarray(s["visits"]) / 1e6
        seeds = len(s["seeds"])
        label = (f"{s['n_spots']:,} spots, {s['data']} ({s['mode']}, "
                 + (f"{seeds} seeds)" if seeds > 1 else f"seed {s['seeds'][0]})"))
        sd = s["ari"].std(axis=0, ddof=1) if seeds > 1 else None
        line = ax.errorbar(x, s["ari"].mean(axis=0), yerr=sd, fmt="o-", capsize=3, label=label)
        ax.plot(x[s["default"]], s["ari"].mean(axis=0)[s["default"]], "s", ms=10, mfc="none",
                color=line[0].get_color())
    ax.set_ylim(0.45, 0.70)  # a fixed scale: differences of 0.005 are not a trend
    ax.set_xscale("log")
    ax.set_xlabel("training budget: spot visits (millions; squares: the default when run)")
    ax.set_ylabel("ARI, mean over slices")
    ax.set_title("DLPFC: ARI against the training budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = RESULTS / "convergence.png"
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
