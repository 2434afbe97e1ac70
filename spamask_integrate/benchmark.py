"""Batch evaluation from a plan: every dataset x method x variant x Harmony x clustering x seed,
one tidy table, resumable, surviving a failing combination.

Variants (``settings.variants``) are named overrides of the defaults, for ablations::

    variants:
      default: {}
      mask_rate_0.3: {train: {mask_rate: 0.3}}
      hvg_input: {preprocess: {n_comps: null}}
      k_6: {k: 6}
      refined: {refine: true}
      embedding_alone: {context_weight: 0}
      merged_from_14: {n_components: 14}   # the caller's merge from 14 components, for every method
      k_components: {n_components: null}   # K components, no merge (default: auto)
"""

from __future__ import annotations

import itertools
import logging
import re
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

#: spamask_reference: the reference's leaky masking (token added, one-direction edge drop);
#: spamask_per_slice: each slice preprocessed, trained and clustered on its own (no Harmony);
#: banksy_<lambda>: the BANKSY peer (pybanksy, the ``peers`` extra) with that lambda;
#: graphst: the GraphST peer (its own package, the ``peers`` extra)
METHODS = ("spamask", "spamask_reference", "spamask_per_slice", "pca", "smoothed_pca",
           "graphst")
_PEER = re.compile(r"banksy_(0(?:\.\d+)?)")


def _known_method(name: str) -> bool:
    return name in METHODS or _PEER.fullmatch(str(name)) is not None
VARIANT_FIELDS = ("train", "preprocess", "k", "refine", "context_weight", "n_components")
_REFERENCE_MASKING = {"mask_mode": "reference", "edge_mask": "reference"}
KEY_COLUMNS = ["dataset", "method", "variant", "harmony", "cluster", "seed"]
RESULT_COLUMNS = KEY_COLUMNS + ["status", "error", "seconds", "kind", "scope", "embedding",
                                "metric", "value"]


@dataclass(frozen=True)
class Combination:
    """One cell of the plan's grid."""

    dataset: str
    method: str
    variant: str
    harmony: bool
    cluster: str
    seed: int

    @property
    def key(self) -> tuple:
        return (self.dataset, self.method, self.variant, bool(self.harmony), self.cluster,
                int(self.seed))


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
    bad = sorted(m for m in settings.get("methods", ["spamask"]) if not _known_method(m))
    if bad:
        raise ConfigError(f"{path}: unknown method(s) {', '.join(map(str, bad))}; use "
                          f"{', '.join(METHODS)} or banksy_<lambda in [0, 1)>")
    variants = settings.get("variants") or {"default": {}}
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: 'variants' must map a name to its overrides")
    for name, over in variants.items():
        over = over or {}
        if not isinstance(over, dict) or set(over) - set(VARIANT_FIELDS):
            raise ConfigError(f"{path}: variant {name!r} may only set "
                              f"{', '.join(VARIANT_FIELDS)}")
        variants[name] = over
    settings["variants"] = {str(k): v for k, v in variants.items()}
    return plan


def _resolve(p: Any, base: Path) -> Path:
    p = Path(str(p)).expanduser()
    return p if p.is_absolute() else (base / p)


def combinations(plan: dict[str, Any]) -> list[Combination]:
    """The grid of the plan, in a stable order: Harmony and clustering settings vary fastest,
    so the combinations that share one trained model come one after another."""
    s = plan["settings"]
    grid = itertools.product(
        [d["name"] for d in plan["datasets"]], s.get("methods", ["spamask"]),
        list(s["variants"]), [int(x) for x in s.get("seeds", [0])],
        [bool(h) for h in s.get("harmony", [True])], s.get("cluster", ["gmm"]))
    out = []
    for dataset, method, variant, seed, harmony, how in grid:
        if method == "spamask_per_slice" and harmony:
            continue  # one slice at a time: nothing for Harmony to align
        out.append(Combination(dataset, method, variant, harmony, how, seed))
    return out


def run_plan(plan_path: str | Path, out_dir: str | Path, *, progress: bool = True,
             report: bool = True) -> pd.DataFrame:
    """Run every combination of the plan not already finished in ``out_dir/results.csv``.

    A failing combination is recorded (status "failed" and the error) and the run goes on;
    finished ones are skipped on the next call, failed ones are tried again. Writes
    ``results.csv`` after each combination, then ``summary.md``, ``summary.png`` and (with
    ``report``) the self-contained ``report.html``.
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
        row = _run_one(plan, combo, cache)
        results = row if results.empty else pd.concat([results, row], ignore_index=True)
        with atomic_write(results_path) as tmp:
            results.to_csv(tmp, index=False)
    write_summary(results, out)
    if report:
        from .report import write_benchmark_report

        write_benchmark_report(out)
    return results


def _key(c: Combination) -> tuple:
    return c.key


def _read_results(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame(columns=RESULT_COLUMNS)
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    if "variant" not in table:  # written before variants existed
        table.insert(KEY_COLUMNS.index("variant"), "variant", "default")
    table["variant"] = table["variant"].astype(str)
    table["harmony"] = table["harmony"].astype(str).str.lower() == "true"
    table["seed"] = table["seed"].astype(int)
    table["embedding"] = table["embedding"].fillna("")
    table["error"] = table["error"].fillna("")
    return table


def _options(plan: dict, ds: dict, variant: str) -> tuple[dict, dict, int | None, bool]:
    """Preprocessing, training, graph-k and label-refinement settings of a dataset under a
    variant."""
    s, over = plan["settings"], plan["settings"]["variants"][variant]
    pre = {**s.get("preprocess", {}), **(over.get("preprocess") or {})}
    train = {**s.get("train", {}), **(over.get("train") or {})}
    k = over.get("k", ds.get("k", s.get("k")))
    refine = bool(_setting(plan, variant, "refine", False))
    return pre, train, k, refine


def _setting(plan: dict, variant: str, key: str, default=None):
    """A setting as the variant overrides it: the variant's value, else the plan's, else
    ``default``."""
    s = plan["settings"]
    return s["variants"][variant].get(key, s.get(key, default))


def _context_weight(plan: dict, variant: str) -> float:
    """Weight of the spatial context in what the caller sees for SpaMask (``context_weight``
    in the settings or a variant; run()'s default otherwise)."""
    from .context import CONTEXT_WEIGHT

    return float(_setting(plan, variant, "context_weight", CONTEXT_WEIGHT))


def _n_components(plan: dict, variant: str) -> int | str | None:
    """Mixture components of the domain caller before they are joined into K domains, for
    every method (``n_components`` in the settings or a variant: a number, ``auto``, the
    default (K and 2 K joined, K kept only if the join loses in space and expression), or
    ``null`` (K, no merge))."""
    from .mixture import N_COMPONENTS

    value = _setting(plan, variant, "n_components", N_COMPONENTS)
    return value if value is None or value == "auto" else int(value)


def _raw(plan: dict, name: str, cache: dict):
    """The dataset as read (labels dropped as the plan says), once per invocation."""
    from .io import read_slices

    if ("raw", name) not in cache:
        ds = next(d for d in plan["datasets"] if d["name"] == name)
        adata = read_slices(ds.get("manifest") or ds["sources"],
                            batch_key=ds.get("batch_key", Keys.BATCH),
                            label_key=ds.get("label_key"),
                            slice_column=ds.get("slice_column"))
        if ds.get("drop_labels"):
            keep = ~adata.obs[ds["label_key"]].astype(str).isin(ds["drop_labels"])
            adata = adata[keep.to_numpy()].copy()
        cache[("raw", name)] = (ds, adata)
    return cache[("raw", name)]


def _prepared(plan: dict, name: str, variant: str, cache: dict):
    """Read + preprocess + graph of a dataset under a variant, once per invocation."""
    from .graph import build_graph
    from .preprocess import preprocess

    ds, raw = _raw(plan, name, cache)
    pre, _, k, _ = _options(plan, ds, variant)
    key = ("prepared", name, repr(sorted(pre.items())), k)
    if key not in cache:
        adata = raw.copy()
        batch_key = ds.get("batch_key", Keys.BATCH)
        preprocess(adata, batch_key=batch_key, **pre)
        build_graph(adata, batch_key, k=k)
        cache[key] = adata
    return ds, cache[key].copy()


def _per_slice(plan: dict, ds: dict, raw, adata, combo: Combination,
               train_opts: dict) -> None:
    """SpaMask on each slice alone (from the counts as read): its own genes, PCA, graph,
    model and K domains, written to ``adata.obs["domain"]`` as "slice:domain"."""
    from .cluster import cluster
    from .graph import build_graph, to_dgl
    from .preprocess import preprocess
    from .train import train

    batch_key = ds.get("batch_key", Keys.BATCH)
    pre, _, k, refine = _options(plan, ds, combo.variant)
    domains = pd.Series("", index=adata.obs_names, dtype=object)
    for name in adata.obs[batch_key].cat.categories:
        one = raw[(raw.obs[batch_key] == name).to_numpy()].copy()
        one.obs[batch_key] = one.obs[batch_key].cat.remove_unused_categories()
        preprocess(one, batch_key=batch_key, **pre)
        build_graph(one, batch_key, k=k)
        train(one, to_dgl(one, batch_key), batch_key, seed=combo.seed, quiet=True, **train_opts)
        cluster(one, ds.get("n_domains", 7), combo.cluster, use_rep=Keys.EMB,
                batch_key=batch_key, refine=refine, seed=combo.seed,
                n_components=_n_components(plan, combo.variant))
        domains[one.obs_names] = f"{name}:" + one.obs[Keys.DOMAIN].astype(str)
    adata.obs[Keys.DOMAIN] = pd.Categorical(domains.to_numpy())


def _run_one(plan: dict, combo: Combination, cache: dict) -> pd.DataFrame:
    from .baselines import banksy, graphst, smoothed_pca
    from .cluster import cluster
    from .context import caller_input
    from .graph import to_dgl
    from .integrate import integrate
    from .metrics import evaluate
    from .train import train

    tic = time.perf_counter()
    base = dict(zip(KEY_COLUMNS, combo.key))
    s = plan["settings"]
    try:
        ds, adata = _prepared(plan, combo.dataset, combo.variant, cache)
        batch_key = ds.get("batch_key", Keys.BATCH)
        _, train_opts, _, refine = _options(plan, ds, combo.variant)
        rep: str | None  # what the caller clusters
        scored: str | None = None  # what scib scores, if not rep
        if combo.method == "spamask_per_slice":
            _per_slice(plan, ds, _raw(plan, combo.dataset, cache)[1], adata, combo,
                       train_opts)
            rep = None
        elif combo.method.startswith("spamask"):
            # one training serves every Harmony / clustering setting of the same seed
            emb_key = ("embedding", combo.dataset, combo.method, combo.variant, combo.seed)
            if emb_key not in cache:
                for old in [k for k in cache if k[0] == "embedding"]:
                    del cache[old]  # keep one embedding: a million spots is 1 GB each
                extra = _REFERENCE_MASKING if combo.method == "spamask_reference" else {}
                train(adata, to_dgl(adata, batch_key), batch_key, seed=combo.seed, quiet=True,
                      **{**train_opts, **extra})
                cache[emb_key] = adata.obsm[Keys.EMB]
            adata.obsm[Keys.EMB] = cache[emb_key]
            # what run() clusters and scores, Harmony included
            weight = _context_weight(plan, combo.variant)
            scored, rep = caller_input(adata, batch_key, weight=weight, harmony=combo.harmony,
                                       seed=combo.seed)
        elif combo.method == "smoothed_pca":
            smoothed_pca(adata, batch_key)
            rep = "X_pca_smoothed"
        elif combo.method == "graphst":
            graphst(adata, batch_key, seed=combo.seed)
            rep = "X_graphst"
        elif _PEER.fullmatch(combo.method):
            lam = float(_PEER.fullmatch(combo.method).group(1))
            banksy(adata, batch_key, lambda_=lam, seed=combo.seed)
            rep = "X_banksy"
        else:
            rep = Keys.PCA
        if combo.harmony and rep is not None and scored is None:
            integrate(adata, batch_key, use_rep=rep, key_added=f"{rep}_harmony", seed=combo.seed)
            rep = f"{rep}_harmony"
        scored = scored or rep
        if rep is not None:
            cluster(adata, ds.get("n_domains", 7), combo.cluster, use_rep=rep,
                    batch_key=batch_key, refine=refine, seed=combo.seed,
                    n_components=_n_components(plan, combo.variant))
        # per-slice embeddings live in unrelated spaces: no joint integration score for them
        scib = bool(s.get("scib", False)) and scored is not None
        table = evaluate(adata, ds.get("label_key"), batch_key, [scored] if scib else None,
                         scib=scib, scib_max_spots=s.get("scib_max_spots", "auto"),
                         seed=combo.seed)
        if scored is not None:
            table["embedding"] = table["embedding"].replace(scored, "embedding")
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
    setting = ["dataset", "method", "variant", "harmony", "cluster"]
    per_seed = ok.groupby(setting + ["seed", "metric"])["value"].mean().unstack("metric")
    return per_seed.groupby(level=setting).agg(["mean", "std", "count"])


def write_summary(results: pd.DataFrame, out: Path) -> None:
    """``summary.md`` (a table per setting, plus failures) and ``summary.png`` (box plot)."""
    summary = summarise(results)
    lines = ["# Benchmark summary", "",
             "Mean per-slice ARI / NMI over seeds (mean ± sd, n = seeds).", ""]
    if not summary.empty:
        lines += ["| dataset | method | variant | harmony | cluster | ARI | NMI | n |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for idx, row in summary.iterrows():
            cells = [f"{row[(m, 'mean')]:.3f} ± {np.nan_to_num(row[(m, 'std')]):.3f}"
                     if (m, "mean") in row else "" for m in ("ARI", "NMI")]
            lines.append(f"| {' | '.join(map(str, idx))} | {' | '.join(cells)} | "
                         f"{int(row[('ARI', 'count')])} |")
    failed = results[results["status"] == "failed"]
    if len(failed):
        lines += ["", "## Failed combinations", ""]
        lines += [f"- {r.dataset} / {r.method} / {r.variant} / harmony={r.harmony} / "
                  f"{r.cluster} / seed {r.seed}: {r.error}" for r in failed.itertuples()]
    with atomic_write(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if not summary.empty:
        with atomic_write(out / "summary.png") as tmp:
            _box_plot(results).savefig(tmp, dpi=110, format="png")


def _box_plot(results: pd.DataFrame):
    from matplotlib.figure import Figure

    ok = results[(results["status"] == "ok") & (results["kind"] == "domain")
                 & (results["metric"] == "ARI") & (results["scope"] != "all")]
    groups = ok.groupby(["dataset", "method", "variant", "harmony", "cluster"])["value"]
    labels = [f"{d}\n{m}{' +H' if h else ''}\n{'' if v == 'default' else v + ' '}{c}"
              for d, m, v, h, c in groups.groups]
    fig = Figure(figsize=(max(4.0, 1.3 * len(labels)), 4.0), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([v.to_numpy() for _, v in groups])
    ax.set_xticks(np.arange(1, len(labels) + 1), labels)
    ax.set_ylabel("per-slice ARI (all seeds)")
    ax.tick_params(axis="x", labelsize=7)
    return fig
