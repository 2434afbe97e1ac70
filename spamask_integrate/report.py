"""One self-contained HTML page per run and per benchmark plan.

The pages are rendered with jinja2 from ``templates/`` (autoescaped). Figures are embedded as
base64 PNG, the sortable tables use a few lines of inline JavaScript, and nothing is fetched
from the network, so a page opens offline and can be mailed as one file. Every score is
printed from ``metrics.csv`` (or ``results.csv``) and carries its exact value in a
``data-value`` attribute, so a reader (or a test) can check the page against the files.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .config import Keys
from .errors import InputError
from .io import atomic_write

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
#: the sections of a run report, in page order (their HTML ids)
RUN_SECTIONS = ("inputs", "scores", "maps", "umap", "training", "parameters", "warnings")
BENCHMARK_SECTIONS = ("summary", "per-slice", "failures")


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("spamask_integrate", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def png_data_uri(fig_or_bytes, dpi: int = 100) -> str:
    """A ``data:image/png;base64,...`` URI of a matplotlib figure or of PNG bytes."""
    if isinstance(fig_or_bytes, bytes):
        raw = fig_or_bytes
    else:
        buffer = io.BytesIO()
        fig_or_bytes.savefig(buffer, dpi=dpi, format="png")
        raw = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def _cell_key(row) -> str:
    return "|".join(str(row[c]) for c in ("kind", "scope", "embedding", "metric"))


def _score_tables(metrics: pd.DataFrame) -> list[dict]:
    """One table per kind of score. Domain accuracy and spatial coherence: a row per scope
    (all spots, then each slice), a column per metric; scib: a row per metric, a column per
    embedding (there are more metrics than embeddings)."""
    tables = []
    layout = {"domain": ("Domain accuracy (labelled spots)", "scope", "metric"),
              "integration": ("Integration (scib-metrics)", "metric", "embedding"),
              "spatial": ("Spatial coherence of the domains", "scope", "metric")}
    for kind, (title, by, across) in layout.items():
        part = metrics[metrics["kind"] == kind]
        if part.empty:
            continue
        cols = list(dict.fromkeys(part[across]))
        rows = []
        for name in dict.fromkeys(part[by]):
            cells = []
            for col in cols:
                hit = part[(part[by] == name) & (part[across] == col)]
                cells.append(None if hit.empty else {"key": _cell_key(hit.iloc[0]),
                                                     "value": float(hit.iloc[0]["value"])})
            rows.append({"name": name, "cells": cells})
        tables.append({"title": title, "by": by, "columns": cols, "rows": rows})
    return tables


def _flatten(prefix: str, value: Any, out: list) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        out.append((prefix, json.dumps(value, default=str) if not isinstance(value, str)
                    else value))


def _uns(adata: ad.AnnData, *keys, default=None):
    node = adata.uns.get(Keys.UNS, {})
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


def _info(metrics: pd.DataFrame, name: str) -> float | None:
    hit = metrics[(metrics["kind"] == "info") & (metrics["metric"] == name)]
    return None if hit.empty else float(hit["value"].iloc[0])


def _warnings(adata: ad.AnnData, metrics: pd.DataFrame, run: dict,
              batch_key: str = Keys.BATCH) -> list[str]:
    from .plot import MAX_SLICE_PANELS

    out = []
    unlabelled = _info(metrics, "n_unlabelled")
    if unlabelled:
        out.append(f"{int(unlabelled):,} spots without a label were left out of ARI and NMI.")
    dropped = _uns(adata, "read", "n_genes_dropped")
    if dropped:
        out.append(f"{int(dropped):,} genes not measured in every slice were dropped "
                   f"(join={_uns(adata, 'read', 'join', default='inner')}); "
                   f"{int(_uns(adata, 'read', 'n_genes_kept', default=adata.n_vars)):,} kept.")
    n_slices = adata.obs[batch_key].nunique() if batch_key in adata.obs else 0
    if n_slices > MAX_SLICE_PANELS:
        out.append(f"The maps show {MAX_SLICE_PANELS} of the {n_slices} slices, evenly "
                   "spaced; every slice's scores are in the tables.")
    scib_n = _info(metrics, "scib_n_spots")
    if scib_n is not None and scib_n < adata.n_obs:
        sized = " (sized to about a minute of scib)" if _info(metrics, "scib_sample_auto") else ""
        out.append(f"scib-metrics scored a seeded sample of {int(scib_n):,} of "
                   f"{adata.n_obs:,} spots, stratified by slice{sized}; set scib_max_spots "
                   "to score more.")
    if _info(metrics, "scib_skipped_one_slice"):
        out.append("One slice only: the scib integration scores were skipped.")
    elif not (metrics["kind"] == "integration").any():
        out.append("scib-metrics was off (--no-scib): no integration scores.")
    if _info(metrics, "scib_labels_are_domains"):
        out.append("No ground truth given: scib's bio-conservation scores use the domains "
                   "as labels, so they measure self-consistency, not accuracy.")
    agreement = _uns(adata, "cluster", "start_agreement")
    merged = _uns(adata, "cluster", "merge_rep")  # starts of more components than domains
    if agreement is not None and float(agreement) < 0.8 and not merged:
        out.append(f"The domain caller's GMM starts agree only at mean ARI "
                   f"{float(agreement):.2f}: some domains are not sharply defined in this "
                   "embedding, and other seeds or K may move them.")
    if run.get("status") not in (None, "ok"):
        out.append(f"run.json records status {run.get('status')!r}.")
    return out


def render_run_report(adata: ad.AnnData, folder: str | Path, metrics: pd.DataFrame | None = None,
                      run: dict | None = None) -> str:
    """The HTML of a run's report, from the AnnData of the run and the files in ``folder``
    (``metrics.csv``, ``run.json``, ``umap.png``, ``scores.png`` when present)."""
    from . import plot

    folder = Path(folder)
    if metrics is None:
        path = folder / "metrics.csv"
        metrics = (pd.read_csv(path, keep_default_na=False, na_values=[""],
                               float_precision="round_trip") if path.is_file()
                   else pd.DataFrame(columns=["kind", "scope", "embedding", "metric", "value"]))
    metrics = metrics.copy()
    metrics["embedding"] = metrics["embedding"].fillna("")
    if run is None:
        path = folder / "run.json"
        run = json.loads(path.read_text()) if path.is_file() else {}
    run_uns = _uns(adata, "run", default={}) or {}
    params = run.get("params") or run_uns.get("params") or {}
    batch_key = params.get("batch_key") or _uns(adata, "read", "batch_key") or Keys.BATCH
    label_key = params.get("label_key") or _uns(adata, "read", "label_key") or None
    if label_key and label_key not in adata.obs:
        label_key = None
    domain_key = (_uns(adata, "cluster", "key_added") or Keys.DOMAIN)
    seed = int((params.get("train") or {}).get("seed", 0))

    counts = adata.obs[batch_key].value_counts(sort=False)
    platforms = _uns(adata, "read", "platforms", default={}) or {}
    slices = [{"name": str(s), "spots": int(counts[s]), "platform": platforms.get(str(s), "")}
              for s in adata.obs[batch_key].cat.categories]
    inputs = {"slices": slices, "n_spots": adata.n_obs, "n_genes": adata.n_vars,
              "genes_kept": _uns(adata, "read", "n_genes_kept", default=adata.n_vars),
              "genes_dropped": _uns(adata, "read", "n_genes_dropped", default=0),
              "join": _uns(adata, "read", "join", default=""),
              "sources": list(run.get("sources") or _uns(adata, "read", "sources", default=[])),
              "label_key": label_key or "", "batch_key": batch_key,
              "n_domains": int(adata.obs[domain_key].nunique())}

    figures = {"maps": png_data_uri(plot.domain_maps(adata, domain_key, batch_key, label_key,
                                                     seed=seed), dpi=90)}
    for name in ("umap", "scores"):
        if (folder / f"{name}.png").is_file():
            figures[name] = png_data_uri((folder / f"{name}.png").read_bytes())
    train = _uns(adata, "train", default={}) or {}
    if len(np.atleast_1d(train.get("loss", []))):
        lam = (train.get("config") or {}).get("lam")
        figures["training"] = png_data_uri(plot.loss_curves(
            np.asarray(train["loss"]), np.asarray(train["sce"]), np.asarray(train["edge"]),
            lam), dpi=100)

    param_rows: list = []
    _flatten("", params, param_rows)
    cluster = {k: v for k, v in (_uns(adata, "cluster", default={}) or {}).items()}
    cluster_rows: list = []
    _flatten("cluster", cluster, cluster_rows)
    seconds = run.get("seconds") or run_uns.get("seconds") or {}
    versions = run_uns.get("versions") or train.get("versions") or {}
    html = _env().get_template("run.html.j2").render(
        title=f"spamask-integrate run: {len(slices)} slices, {adata.n_obs:,} spots",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(map(str, run.get("command") or [])), inputs=inputs,
        tables=_score_tables(metrics[metrics["kind"] != "info"]), figures=figures,
        training={"epochs": int(train.get("epochs_run", 0) or 0),
                  "auto": (train.get("config") or {}).get("epochs") == "auto",
                  "mode": train.get("mode", ""), "device": train.get("device", ""),
                  "seconds": float(train.get("train_seconds", 0) or 0)},
        params=param_rows + cluster_rows, seed=seed,
        seconds=_in_step_order(seconds),
        versions={str(k): str(v) for k, v in dict(versions).items()},
        warnings=_warnings(adata, metrics, run, batch_key), sections=RUN_SECTIONS)
    return html


STEPS = ("read", "preprocess", "graph", "train", "integrate", "cluster", "evaluate", "write",
         "total")


def _in_step_order(seconds: dict) -> dict[str, float]:
    """Seconds per step in pipeline order (an h5ad round trip sorts dict keys)."""
    order = [k for k in STEPS if k in seconds] + sorted(k for k in seconds if k not in STEPS)
    return {k: float(seconds[k]) for k in order}


def write_run_report(out_dir: str | Path) -> Path:
    """Rebuild ``OUT/report.html`` from a finished run folder (e.g. after ``evaluate``)."""
    out = Path(out_dir)
    h5ad = out / "integrated.h5ad"
    if not h5ad.is_file():
        raise InputError(f"{out}: no integrated.h5ad here; is this a finished run folder?")
    adata = ad.read_h5ad(h5ad)
    html = render_run_report(adata, out)
    with atomic_write(out / REPORT_NAME) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out / REPORT_NAME


# ------------------------------------------------------------------------------- benchmark
def render_benchmark_report(results: pd.DataFrame, title: str = "benchmark") -> str:
    """The HTML of a benchmark plan's report from its tidy ``results.csv`` rows."""
    from .benchmark import summarise

    setting = ["dataset", "method", "variant", "harmony", "cluster"]
    summary = summarise(results)
    rows = []
    if not summary.empty:
        for idx, r in summary.iterrows():
            cells = []
            for metric in ("ARI", "NMI"):
                mean = float(r[(metric, "mean")]) if (metric, "mean") in r else float("nan")
                sd = float(r[(metric, "std")]) if (metric, "std") in r else float("nan")
                cells.append({"metric": metric, "mean": mean, "sd": sd})
            rows.append({"setting": [str(v) for v in idx], "cells": cells,
                         "seeds": int(r[("ARI", "count")]) if ("ARI", "count") in r else 0})
        rows.sort(key=lambda row: -np.nan_to_num(row["cells"][0]["mean"], nan=-1.0))
    figures = []
    ok = results[(results["status"] == "ok") & (results["kind"] == "domain")
                 & (results["metric"] == "ARI") & (results["scope"] != "all")]
    for dataset, part in ok.groupby("dataset", sort=False):
        figures.append({"dataset": str(dataset), "uri": png_data_uri(_slice_boxes(part),
                                                                     dpi=90)})
    failed = results[results["status"] == "failed"].drop_duplicates(
        setting + ["seed"])
    failures = [{"setting": " / ".join(str(getattr(r, c)) for c in setting),
                 "seed": int(r.seed), "error": str(r.error).splitlines()[0] if r.error else ""}
                for r in failed.itertuples()]
    return _env().get_template("benchmark.html.j2").render(
        title=f"spamask-integrate benchmark: {title}",
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        columns=setting, rows=rows, figures=figures, failures=failures,
        n_combinations=int(results[setting + ["seed"]].drop_duplicates().shape[0]),
        sections=BENCHMARK_SECTIONS)


def _slice_boxes(part: pd.DataFrame):
    """Per-slice ARI over seeds: one group of boxes per slice, one box per setting."""
    from matplotlib.figure import Figure

    from .plot import _palette

    part = part.assign(setting=[f"{m}{' +H' if str(h) == 'True' else ''}"
                                f"{'' if v == 'default' else ' ' + v} {c}"
                                for m, v, h, c in zip(part["method"], part["variant"],
                                                      part["harmony"], part["cluster"])])
    settings = list(dict.fromkeys(part["setting"]))
    slices = list(dict.fromkeys(part["scope"]))
    colours = _palette(len(settings))
    width = 0.8 / len(settings)
    fig = Figure(figsize=(max(5.0, 1.0 + 0.45 * len(settings) * len(slices)), 3.8),
                 layout="constrained")
    ax = fig.subplots()
    for j, name in enumerate(settings):
        data = [part[(part["setting"] == name) & (part["scope"] == s)]["value"].to_numpy()
                for s in slices]
        pos = np.arange(len(slices)) + (j - (len(settings) - 1) / 2) * width
        box = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                         manage_ticks=False, medianprops={"color": "black"})
        for patch in box["boxes"]:
            patch.set_facecolor(colours[j])
        ax.plot([], [], "s", color=colours[j], label=name)
    ax.set_xticks(np.arange(len(slices)), [str(s) for s in slices], fontsize=8)
    ax.set_ylabel("ARI (one point per seed)")
    ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return fig


def write_benchmark_report(out_dir: str | Path) -> Path:
    """Write (or rebuild) ``OUT/report.html`` of a benchmark folder from ``results.csv``."""
    from .benchmark import _read_results

    out = Path(out_dir)
    if not (out / "results.csv").is_file():
        raise InputError(f"{out}: no results.csv here; is this a benchmark folder?")
    html = render_benchmark_report(_read_results(out / "results.csv"), title=out.name)
    with atomic_write(out / REPORT_NAME) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out / REPORT_NAME


def write_report(folder: str | Path) -> Path:
    """Rebuild the report of a run folder or of a benchmark folder, whichever it is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    if (folder / "integrated.h5ad").is_file():
        return write_run_report(folder)
    if (folder / "results.csv").is_file():
        return write_benchmark_report(folder)
    raise InputError(f"{folder}: neither a run (integrated.h5ad) nor a benchmark (results.csv) "
                     "folder")
