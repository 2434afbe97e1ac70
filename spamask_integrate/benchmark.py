"""Batch evaluation from a plan: every dataset x method x Harmony x clustering x seed, one tidy
table, resumable, surviving a failing combination."""

from __future__ import annotations

import itertools
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import Keys
from .errors import ConfigError, SpamaskError
from .io import atomic_write

logger = logging.getLogger(__name__)

#: spamask_reference: the reference's leaky masking (token added, one-direction edge drop)
METHODS = ("spamask", "spamask_reference", "pca", "smoothed_pca")
_REFERENCE_MASKING = {"mask_mode": "reference", "edge_mask": "reference"}
KEY_COLUMNS = ["dataset", "method", "harmony", "cluster", "seed"]
RESULT_COLUMNS = KEY_COLUMNS + ["status", "error", "seconds", "kind", "scope", "embedding",
                                "metric", "value"]


@dataclass(frozen=True)
class Combination:
    """One cell of the plan's grid."""

    dataset: str
    method: str
    harmony: bool
    cluster: str
    seed: int

    @property
    def key(self) -> tuple:
        return (self.dataset, self.method, bool(self.harmony), self.cluster, int(self.seed))


def load_plan(path: str | Path) -> dict[str, Any]:
    """Read and check a YAML plan; relative source paths are resolved against its folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: plan file not found")
    try:
        plan = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(plan, dict) or not isinstance(plan.get("datasets"), list) \
            or not plan["datasets"]:
        raise ConfigError(f"{path}: the plan needs a non-empty 'datasets' list")
    names = []
    for i, ds in enumerate(plan["datasets"]):
        if not isinstance(ds, dict) or "name" not in ds or not (ds.get("sources")
                                                                 or ds.get("manifest")):
            raise ConfigError(f"{path}: dataset {i + 1} needs 'name' and 'sources' or 'manifest'")
        names.append(ds["name"])
        for field in ("sources",):
            if ds.get(field):
                ds[field] = [str(_resolve(s, path.parent)) for s in ds[field]]
        if ds.get("manifest"):
            ds["manifest"] = str(_resolve(ds["manifest"], path.parent))
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: dataset names must be unique")
    settings = plan.setdefault("settings", {}) or {}
    plan["settings"] = settings
    bad = sorted(set(settings.get("methods", ["spamask"])) - set(METHODS))
    if bad:
        raise ConfigError(f"{path}: unknown method(s) {', '.join(bad)}; use {', '.join(METHODS)}")
    return plan


def _resolve(p: Any, base: Path) -> Path:
    p = Path(str(p)).expanduser()
    return p if p.is_absolute() else (base / p)


def combinations(plan: dict[str, Any]) -> list[Combination]:
    """The grid of the plan, in a stable order."""
    s = plan["settings"]
    grid = itertools.product(
        [d["name"] for d in plan["datasets"]], s.get("methods", ["spamask"]),
        [bool(h) for h in s.get("harmony", [True])], s.get("cluster", ["gmm"]),
        [int(x) for x in s.get("seeds", [0])])
    return [Combination(*c) for c in grid]


def run_plan(plan_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> pd.DataFrame:
    """Run every combination of the plan not already finished in ``out_dir/results.csv``.

    A failing combination is recorded (status "failed" and the error) and the run goes on;
    finished ones are skipped on the next call, failed ones are tried again. Writes
    ``results.csv`` after each combination, then ``summary.md`` and ``summary.png``.
    """
    from tqdm.auto import tqdm

    plan = load_plan(plan_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.csv"
    results = _read_results(results_path)
    done = {tuple(r) for r in results.loc[results["status"] == "ok", KEY_COLUMNS]
            .drop_duplicates().itertuples(index=False)}
    results = results[results["status"] == "ok"]
    todo = [c for c in combinations(plan) if _key(c) not in done]
    logger.info("benchmark: %d combinations, %d already finished, %d to run",
                len(combinations(plan)), len(combinations(plan)) - len(todo), len(todo))
    cache: dict[str, Any] = {}
    for combo in tqdm(todo, desc="benchmark", disable=not progress):
        results = pd.concat([results, _run_one(plan, combo, cache)], ignore_index=True)
        with atomic_write(results_path) as tmp:
            results.to_csv(tmp, index=False)
    write_summary(results, out)
    return results


def _key(c: Combination) -> tuple:
    return (c.dataset, c.method, bool(c.harmony), c.cluster, int(c.seed))


def _read_results(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=RESULT_COLUMNS)
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    table["harmony"] = table["harmony"].astype(str).str.lower() == "true"
    table["seed"] = table["seed"].astype(int)
    table["embedding"] = table["embedding"].fillna("")
    table["error"] = table["error"].fillna("")
    return table


def _prepared(plan: dict, name: str, cache: dict):
    """Read + preprocess + graph of a dataset, once per invocation."""
    from .graph import build_graph
    from .io import read_slices
    from .preprocess import preprocess

    if name not in cache:
        ds = next(d for d in plan["datasets"] if d["name"] == name)
        batch_key = ds.get("batch_key", Keys.BATCH)
        adata = read_slices(ds.get("manifest") or ds["sources"], batch_key=batch_key,
                            label_key=ds.get("label_key"))
        if ds.get("drop_labels"):
            keep = ~adata.obs[ds["label_key"]].astype(str).isin(ds["drop_labels"])
            adata = adata[keep.to_numpy()].copy()
        preprocess(adata, batch_key=batch_key, **plan["settings"].get("preprocess", {}))
        build_graph(adata, batch_key, k=ds.get("k", plan["settings"].get("k")))
        cache[name] = (ds, adata)
    ds, adata = cache[name]
    return ds, adata.copy()


def _run_one(plan: dict, combo: Combination, cache: dict) -> pd.DataFrame:
    from .baselines import smoothed_pca
    from .cluster import cluster
    from .graph import to_dgl
    from .integrate import integrate
    from .metrics import evaluate
    from .train import train

    tic = time.perf_counter()
    base = dict(zip(KEY_COLUMNS, combo.key))
    s = plan["settings"]
    try:
        ds, adata = _prepared(plan, combo.dataset, cache)
        batch_key = ds.get("batch_key", Keys.BATCH)
        if combo.method.startswith("spamask"):
            extra = _REFERENCE_MASKING if combo.method == "spamask_reference" else {}
            train(adata, to_dgl(adata, batch_key), batch_key, seed=combo.seed, quiet=True,
                  **{**s.get("train", {}), **extra})
            rep = Keys.EMB
        elif combo.method == "smoothed_pca":
            smoothed_pca(adata, batch_key)
            rep = "X_pca_smoothed"
        else:
            rep = Keys.PCA
        if combo.harmony:
            integrate(adata, batch_key, use_rep=rep, key_added=f"{rep}_harmony", seed=combo.seed)
            rep = f"{rep}_harmony"
        cluster(adata, ds.get("n_domains", 7), combo.cluster, use_rep=rep, batch_key=batch_key,
                refine=bool(s.get("refine", False)), seed=combo.seed)
        scib = bool(s.get("scib", False))
        table = evaluate(adata, ds.get("label_key"), batch_key, [rep] if scib else None,
                         scib=scib, scib_max_spots=int(s.get("scib_max_spots", 20_000)),
                         seed=combo.seed)
        table["embedding"] = table["embedding"].replace(rep, "embedding")
        for col, value in base.items():
            table[col] = value
        table["status"], table["error"] = "ok", ""
        table["seconds"] = time.perf_counter() - tic
        return table[RESULT_COLUMNS]
    except (SpamaskError, ValueError, RuntimeError, OSError, KeyError) as exc:
        logger.warning("benchmark: %s failed: %s", combo, exc)
        logger.debug("%s", traceback.format_exc())
        return pd.DataFrame([{**base, "status": "failed",
                              "error": f"{exc.__class__.__name__}: {exc}".splitlines()[0],
                              "seconds": time.perf_counter() - tic, "kind": "", "scope": "",
                              "embedding": "", "metric": "", "value": np.nan}])[RESULT_COLUMNS]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of the mean per-slice ARI and NMI, per setting."""
    ok = results[(results["status"] == "ok") & (results["kind"] == "domain")
                 & (results["scope"] != "all") & results["metric"].isin(["ARI", "NMI"])]
    if ok.empty:
        return pd.DataFrame()
    per_seed = ok.groupby(["dataset", "method", "harmony", "cluster", "seed", "metric"])[
        "value"].mean().unstack("metric")
    return per_seed.groupby(level=["dataset", "method", "harmony", "cluster"]).agg(
        ["mean", "std", "count"])


def write_summary(results: pd.DataFrame, out: Path) -> None:
    """``summary.md`` (a table per setting, plus failures) and ``summary.png`` (box plot)."""
    summary = summarise(results)
    lines = ["# Benchmark summary", "",
             "Mean per-slice ARI / NMI over seeds (mean ± sd, n = seeds).", ""]
    if not summary.empty:
        lines += ["| dataset | method | harmony | cluster | ARI | NMI | n |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for idx, row in summary.iterrows():
            cells = [f"{row[(m, 'mean')]:.3f} ± {np.nan_to_num(row[(m, 'std')]):.3f}"
                     if (m, "mean") in row else "" for m in ("ARI", "NMI")]
            lines.append(f"| {' | '.join(map(str, idx))} | {' | '.join(cells)} | "
                         f"{int(row[('ARI', 'count')])} |")
    failed = results[results["status"] == "failed"]
    if len(failed):
        lines += ["", "## Failed combinations", ""]
        lines += [f"- {r.dataset} / {r.method} / harmony={r.harmony} / {r.cluster} / "
                  f"seed {r.seed}: {r.error}" for r in failed.itertuples()]
    with atomic_write(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if not summary.empty:
        with atomic_write(out / "summary.png") as tmp:
            _box_plot(results).savefig(tmp, dpi=110, format="png")


def _box_plot(results: pd.DataFrame):
    from matplotlib.figure import Figure

    ok = results[(results["status"] == "ok") & (results["kind"] == "domain")
                 & (results["metric"] == "ARI") & (results["scope"] != "all")]
    groups = ok.groupby(["dataset", "method", "harmony", "cluster"])["value"]
    labels = [f"{d}\n{m}{' +H' if h else ''}\n{c}" for d, m, h, c in groups.groups]
    fig = Figure(figsize=(max(4.0, 1.3 * len(labels)), 4.0), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([v.to_numpy() for _, v in groups])
    ax.set_xticks(np.arange(1, len(labels) + 1), labels)
    ax.set_ylabel("per-slice ARI (all seeds)")
    ax.tick_params(axis="x", labelsize=7)
    return fig
