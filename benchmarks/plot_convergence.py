"""Plot of benchmarks/results/convergence_*.json: ARI against training steps, one line per size.

Usage: python benchmarks/plot_convergence.py   ->  benchmarks/results/convergence.png
"""

from __future__ import annotations

import json

from _common import RESULTS


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for path in sorted(RESULTS.glob("convergence_*.json")):
        run = json.loads(path.read_text())
        pts = run["points"]
        label = f"{run['n_spots']:,} spots ({run['mode']}, seed {run['seed']})"
        ax.plot([p["steps"] for p in pts], [p["ari_mean_slice"] for p in pts], "o-", label=label)
        ax.plot([p["steps"] for p in pts], [p["ari_pooled"] for p in pts], "x:", color="grey")
    ax.axvline(150, color="black", lw=0.8, ls="--", label="default budget (150 steps)")
    ax.set_ylim(0.45, 0.70)  # a fixed scale: differences of 0.005 are not a trend
    ax.set_xlabel("optimiser steps (tile subgraphs of up to 16,384 spots)")
    ax.set_ylabel("ARI (mean over slices; x: pooled)")
    ax.set_title("Tiled DLPFC: ARI against the training budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "convergence.png"
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
