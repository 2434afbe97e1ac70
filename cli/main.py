"""The ``spamask-integrate`` command line: argument handling around the library, nothing more.

Errors: a library error prints one line ``Error: ...`` (``-v`` adds the traceback) and exits
with 2 for usage errors (bad options, config, plan) and 1 for data errors.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click

EXAMPLES_RUN = """
\b
Examples:
  spamask-integrate run data/151673.h5ad data/151674.h5ad -o out --label-key layer
  spamask-integrate run --manifest slices.yaml -o out --n-domains auto --cluster leiden
  spamask-integrate run atlas.h5ad --slice-column sample -o out --n-domains 12
  spamask-integrate run a.h5ad b.h5ad -o out --minibatch --sampler neighbor --fanouts 10,10
  spamask-integrate run --manifest atlas.yaml -o out --nproc 4 --shard-slices
"""


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("spamask_integrate")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def handle_errors(func):
    """Turn library errors into one line and an exit code; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from spamask_integrate.errors import ConfigError, SpamaskError

        ctx = click.get_current_context()
        verbose = (ctx.find_root().params or {}).get("verbose", 0)
        try:
            return func(*args, **kwargs)
        except SpamaskError as exc:
            if verbose:
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2 if isinstance(exc, ConfigError) else 1)
        except KeyboardInterrupt:
            click.echo("Interrupted: no partial output was left behind.", err=True)
            ctx.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spamask-integrate", prog_name="spamask-integrate")
@click.option("-v", "--verbose", count=True, help="More log output; tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors, no progress bars.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where compiled scib-metrics (jax) and umap (numba) kernels are kept "
                   "between runs (default $SPAMASK_CACHE_DIR, else "
                   "~/.cache/spamask-integrate).")
@click.option("--no-cache", is_flag=True,
              help="Compile scib-metrics' and umap's kernels afresh in this run; keep nothing "
                   "on disk.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, cache_dir: Path | None,
         no_cache: bool) -> None:
    """Spatial domains and multi-slice integration with SpaMask on DGL.

    \b
    Start with:  spamask-integrate demo -o demo_out
    """
    from .blas import choose_openblas_kernels

    core = choose_openblas_kernels()  # first: before anything loads numpy's OpenBLAS
    ctx.ensure_object(dict)
    ctx.obj.update(verbose=verbose, quiet=quiet)
    _setup_logging(verbose, quiet)
    log = logging.getLogger("spamask_integrate")
    if log.isEnabledFor(logging.DEBUG):
        from spamask_integrate.utils import numpy_blas

        how = (f"OPENBLAS_CORETYPE={core} set from the CPU's flags" if core else
               "OPENBLAS_CORETYPE as the user set it" if "OPENBLAS_CORETYPE" in os.environ
               else "OpenBLAS's own choice")
        log.debug("numpy's BLAS: %s (%s)", numpy_blas(), how)
    if not no_cache:
        from spamask_integrate.utils import enable_compile_cache

        where = enable_compile_cache(cache_dir)
        log.debug("jax compilation cache: %s", where)


# ------------------------------------------------------------------------------------ helpers
def _parse_k(value: str | None) -> int | None:
    from spamask_integrate.errors import ConfigError

    if value is None or str(value).lower() == "auto":
        return None
    try:
        k = int(value)
    except ValueError as exc:
        raise ConfigError(f"--n-domains {value!r}: give an integer >= 2 or 'auto'") from exc
    if k < 2:
        raise ConfigError(f"--n-domains {k}: must be at least 2 (or 'auto')")
    return k


def _parse_components(value: str) -> int | str | None:
    """``--n-components``: 'auto', 'K' (K components, no merge: None) or an integer >= 2."""
    from spamask_integrate.errors import ConfigError

    word = str(value).lower()
    if word in ("auto", "k"):
        return {"auto": "auto", "k": None}[word]
    try:
        m = int(value)
    except ValueError as exc:
        raise ConfigError(f"--n-components {value!r}: give 'auto', 'K' or an integer >= 2") \
            from exc
    if m < 2:
        raise ConfigError(f"--n-components {m}: must be at least 2 (or 'auto', 'K')")
    return m


def _parse_fanouts(value: str | None) -> tuple[int, ...] | None:
    from spamask_integrate.errors import ConfigError

    if value is None:
        return None
    try:
        fan = tuple(int(v) for v in value.split(","))
    except ValueError as exc:
        raise ConfigError(f"--fanouts {value!r}: comma-separated integers, e.g. 10,10") from exc
    if len(fan) == 2:  # two encoder layers given: the decoder layer reuses the last fan-out
        fan = fan + (fan[-1],)
    if len(fan) != 3 or min(fan) < 1:
        raise ConfigError(f"--fanouts {value!r}: give 2 or 3 positive integers")
    return fan


def _read_config(path: str | None) -> dict[str, Any]:
    from spamask_integrate.errors import ConfigError

    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of parameters")
    return data


def _check_out_dir(out: Path, overwrite: bool) -> None:
    import tempfile

    from spamask_integrate.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {out}: exists and is not a folder")
    if (out / "integrated.h5ad").exists() and not overwrite:
        raise ConfigError(f"-o {out}: holds a finished run; pass --overwrite or another folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise ConfigError(f"-o {out}: not writable ({exc.strerror or exc})") from exc
    finally:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()  # nothing left behind if the run fails before writing


def _print_scores(metrics, out: Path | None) -> None:
    dom = metrics[(metrics["kind"] == "domain") & metrics["metric"].isin(["ARI", "NMI"])]
    if len(dom):
        wide = dom.pivot_table(index="scope", columns="metric", values="value", sort=False)
        click.echo("Domain accuracy (labelled spots):")
        click.echo(wide.round(3).to_string())
    integ = metrics[(metrics["kind"] == "integration") & metrics["metric"].isin(
        ["Bio conservation", "Batch correction", "Total"])]
    if len(integ):
        click.echo("Integration (scib-metrics):")
        click.echo(integ.pivot_table(index="embedding", columns="metric", values="value")
                   .round(3).to_string())
    coh = metrics[(metrics["kind"] == "spatial") & (metrics["scope"] == "all")]
    if len(coh):
        click.echo("Spatial coherence: " + ", ".join(
            f"{r.metric} {r.value:.3f}" for r in coh.itertuples()))
    if out is not None:
        click.echo(f"Results and figures in {out}/ (report.html, spatial_domains.png, umap.png, "
                   "scores.png)")


# ------------------------------------------------------------------------------------ run
RUN_KEYS = {"batch_key", "label_key", "slice_column", "n_domains", "cluster_method", "harmony", "refine",
            "n_starts", "keep_starts", "spatial_prior", "n_components", "context_weight", "graph_method", "k", "radius", "platform", "scib",
            "scib_max_spots", "figures"}


@main.command(epilog=EXAMPLES_RUN)
@click.argument("sources", nargs=-1, type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output folder (created).")
@click.option("--manifest", type=click.Path(), help="YAML/CSV manifest listing the slices.")
@click.option("--batch-key", default=None, help="obs column for slice names [slice].")
@click.option("--label-key", default=None, help="Ground-truth obs column, for scoring.")
@click.option("--slice-column", default=None,
              help="obs column that splits each file into slices (an atlas in one h5ad).")
@click.option("--n-domains", default=None, help="Number of domains K, or 'auto' [7].")
@click.option("--cluster", "cluster_method", type=click.Choice(["gmm", "kmeans", "leiden"]),
              default=None, help="Clustering method [gmm].")
@click.option("--harmony/--no-harmony", default=None, help="Harmony [on for several slices].")
@click.option("--refine/--no-refine", default=None, help="Spatial majority-vote refinement.")
@click.option("--n-starts", type=click.IntRange(min=1), default=None,
              help="GMM starts of the domain caller [120].")
@click.option("--keep-starts", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Share of the GMM starts, the most likely, among which the domain caller "
                   "picks the most typical one; 1 = all [0.75].")
@click.option("--spatial-prior", type=click.FloatRange(min=0), default=None,
              help="Potts strength of the domain caller, 0 = none [4].")
@click.option("--n-components", default=None, metavar="auto|K|M",
              help="Mixture components of the domain caller, joined into K domains where "
                   "both the expression and the embedding call them alike: 'auto' = K and "
                   "2 K, keeping the one the caller's own model (expression and spatial "
                   "prior) scores higher; "
                   "a number M > K: always joined; 'K' = K components, no merge (see "
                   "benchmarks/README.md) [auto].")
@click.option("--context-weight", type=click.FloatRange(min=0), default=None,
              help="Weight of the input's spatial context beside the embedding in what the "
                   "domain caller sees, 0 = the embedding alone [0.5].")
@click.option("--graph", "graph_method", type=click.Choice(["knn", "radius"]), default=None,
              help="Spatial graph [knn].")
@click.option("--k", type=int, default=None, help="Neighbours per spot [platform preset].")
@click.option("--radius", type=float, default=None, help="Radius for --graph radius.")
@click.option("--epochs", default=None,
              help="Training epochs, or 'auto': 100 full-graph epochs up to 16,384 spots, "
                   "150 steps of 16,384 spots on larger data [auto].")
@click.option("--n-models", type=click.IntRange(min=1), default=None,
              help="Models trained with seeds drawn from --seed, embeddings side by side: "
                   "steadier domains for N times the training [1].")
@click.option("--minibatch", "mode", flag_value="minibatch",
              help="Train on parts of the graph (see --sampler).")
@click.option("--full-graph", "mode", flag_value="full", help="Whole graph each step.")
@click.option("--auto", "mode", flag_value="auto", default=True,
              help="Minibatches above 16,384 spots [default].")
@click.option("--sampler", type=click.Choice(["subgraph", "neighbor"]), default=None,
              help="Minibatches of spatial tiles with their 3-hop halo, or DGL neighbour "
                   "sampling [subgraph].")
@click.option("--batch-size", type=int, default=None,
              help="Seed spots per neighbour-sampled minibatch [1024].")
@click.option("--fanouts", default=None, help="Neighbours sampled per layer, e.g. 10,10.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Device [auto].")
@click.option("--seed", type=int, default=None, help="Seed of every random step [2023].")
@click.option("--config", "config_path", type=click.Path(),
              help="YAML with run parameters and 'train'/'preprocess' sections.")
@click.option("--no-scib", is_flag=True, help="Skip scib-metrics (slow on large data).")
@click.option("--no-report", is_flag=True, help="Do not write OUT/report.html.")
@click.option("--checkpoint-every", type=int, default=0,
              help="Write OUT/checkpoint.pt every E epochs (removed when the run succeeds).")
@click.option("--resume", is_flag=True, help="Continue training from OUT/checkpoint.pt.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel training processes on this machine (torchrun).")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Machines in all.")
@click.option("--node-rank", type=int, default=0, show_default=True,
              help="This machine's rank (0 writes the results).")
@click.option("--master-addr", default="127.0.0.1", show_default=True,
              help="Address of node 0 for several machines.")
@click.option("--master-port", type=int, default=None, help="Port on node 0 [a free one].")
@click.option("--shard-slices", is_flag=True,
              help="Each of the --nproc x --nnodes ranks reads, preprocesses and trains on "
                   "only its share of the slices (atlases larger than one machine).")
@click.option("--overwrite", is_flag=True, help="Replace a finished run in OUT.")
@click.pass_context
@handle_errors
def run(ctx: click.Context, sources, out: Path, manifest, config_path, mode, epochs, n_models,
        sampler,
        batch_size, fanouts, device, seed, n_domains, no_scib, no_report, checkpoint_every, resume, nproc,
        nnodes, node_rank, master_addr, master_port, shard_slices, overwrite,
        **options) -> None:
    """Run the whole pipeline on SOURCES (.h5ad files, Visium folders, ...) into OUT.

    Writes integrated.h5ad, domains.csv, metrics.csv/.json, PNG figures, run.json and
    report.html (one self-contained page with all of it).
    """
    import spamask_integrate as si
    from spamask_integrate.errors import ConfigError

    if not sources and not manifest:
        raise ConfigError("give SOURCES or --manifest")
    if sources and manifest:
        raise ConfigError("give SOURCES or --manifest, not both")
    cfg = _read_config(config_path)
    unknown = sorted(set(cfg) - RUN_KEYS - {"train", "preprocess"})
    if unknown:
        raise ConfigError(f"{config_path}: unknown key(s) {', '.join(unknown)}")
    params = {k: v for k, v in cfg.items() if k in RUN_KEYS}
    params.update({k: v for k, v in options.items() if v is not None})
    if options.get("n_components") is not None:
        params["n_components"] = _parse_components(options["n_components"])
    if n_domains is not None or "n_domains" not in params:
        params["n_domains"] = _parse_k(n_domains) if n_domains is not None else 7
    if no_scib:
        params["scib"] = False
    train_opts = dict(cfg.get("train") or {})
    flags = {"epochs": epochs, "n_models": n_models, "sampler": sampler,
             "batch_size": batch_size,
             "fanouts": _parse_fanouts(fanouts),
             "device": device, "seed": seed,
             "minibatch": {"minibatch": True, "full": False}.get(mode) if mode != "auto"
             else train_opts.get("minibatch")}
    train_opts.update({k: v for k, v in flags.items() if v is not None})
    train_opts["quiet"] = bool(ctx.obj["quiet"])
    config = si.SpamaskConfig().replace(**train_opts)
    _check_out_dir(out, overwrite)
    tic = time.perf_counter()
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ConfigError("--nproc and --nnodes must be >= 1 and 0 <= --node-rank < --nnodes")
    if (nnodes > 1 or nproc > 1) and mode == "full" and not shard_slices:
        raise ConfigError("--nproc/--nnodes train with minibatches; drop --full-graph "
                          "(or shard the slices with --shard-slices)")
    checkpoint = out / "checkpoint.pt" if (checkpoint_every or resume) else None
    if checkpoint is not None:
        out.mkdir(parents=True, exist_ok=True)
    adata = si.run(manifest or list(sources), None, config=config,
                   preprocess_kwargs=cfg.get("preprocess"), checkpoint=checkpoint,
                   checkpoint_every=checkpoint_every, resume=resume, nproc=nproc,
                   nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                   master_port=master_port, shard_slices=shard_slices, **params)
    if node_rank > 0:
        click.echo(f"node {node_rank}: training done; node 0 writes the results")
        return
    from spamask_integrate.io import write_outputs
    from spamask_integrate.metrics import metrics_table

    metrics = metrics_table(adata)
    info = adata.uns["spamask"]["run"]
    record = {"status": "ok", "exit_code": 0, "command": sys.argv,
              "sources": [str(s) for s in (sources or [manifest])],
              "params": _jsonable(info["params"]), "versions": _jsonable(info["versions"]),
              "seconds": {**_jsonable(info["seconds"]),  # "total" excludes writing the files
                          "total": round(time.perf_counter() - tic, 3)},
              "n_spots": int(adata.n_obs), "n_slices": int(adata.obs[params.get(
                  "batch_key", "slice")].nunique())}
    write_outputs(adata, out, metrics, batch_key=params.get("batch_key", "slice"),
                  figures=params.get("figures", True), seed=config.seed,
                  extra_files={"run.json": json.dumps(record, indent=1)},
                  report=not no_report)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    _print_scores(metrics, out)


def _jsonable(value):
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------ evaluate
@main.command(epilog="""
\b
Examples:
  spamask-integrate evaluate out/integrated.h5ad --label-key layer -o scores.csv
  spamask-integrate evaluate other_tool.h5ad --label-key layer --domain-key mclust \\
      --embedding-keys X_pca,X_stagate
""")
@click.argument("integrated", type=click.Path())
@click.option("--label-key", default=None, help="Ground-truth obs column.")
@click.option("--batch-key", default="slice", show_default=True)
@click.option("--domain-key", default="domain", show_default=True)
@click.option("--embedding-keys", default=None,
              help="Comma-separated obsm keys for scib [those a run wrote].")
@click.option("--no-scib", is_flag=True, help="Skip scib-metrics.")
@click.option("--scib-max-spots", default=None,
              help="Spots scib scores (a seeded sample by slice), or 'auto': about a minute "
                   "of scib on 2 cores [the run's, else auto].")
@click.option("--seed", type=int, default=None, help="Seed of the scib sample [the run's].")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Write the tidy table here (CSV).")
@handle_errors
def evaluate(integrated, label_key, batch_key, domain_key, embedding_keys, no_scib,
             scib_max_spots, seed, out) -> None:
    """Score an existing result (of this tool or another) in INTEGRATED.h5ad."""
    import anndata as ad

    import spamask_integrate as si
    from spamask_integrate.errors import ConfigError, InputError
    from spamask_integrate.io import atomic_write

    path = Path(integrated)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from exc
    run_params = adata.uns.get("spamask", {}).get("run", {}).get("params", {})
    seed = seed if seed is not None else int(run_params.get("train", {}).get("seed", 0))
    scib_max = scib_max_spots or run_params.get("scib_max_spots", "auto")
    if scib_max != "auto":
        try:
            scib_max = int(scib_max)
        except ValueError:
            raise ConfigError(f"--scib-max-spots {scib_max!r}: give 'auto' or a number") from None
    keys = embedding_keys.split(",") if embedding_keys else None
    if keys is None and "harmony" in run_params:
        keys = ["X_pca", "X_spamask"] + (["X_spamask_harmony"] if run_params["harmony"] else [])
    table = si.evaluate(adata, label_key, batch_key, keys, domain_key=domain_key,
                        scib=not no_scib, scib_max_spots=scib_max, seed=seed)
    if out is not None:
        with atomic_write(out) as tmp:
            table.to_csv(tmp, index=False)
    _print_scores(table, None)
    if out is not None:
        click.echo(f"Wrote {out}")


# ------------------------------------------------------------------------------------ benchmark
@main.command(epilog="""
\b
A plan (YAML):
  datasets:
    - name: dlpfc
      sources: [151673.h5ad, 151674.h5ad]
      label_key: layer
      n_domains: 7
  settings:
    methods: [spamask, pca, smoothed_pca]
    harmony: [true, false]
    cluster: [gmm]
    seeds: [0, 1, 2]
    train: {epochs: 300}
\b
Example:
  spamask-integrate benchmark plan.yaml -o bench_out
""")
@click.argument("plan", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path))
@click.option("--no-report", is_flag=True, help="Do not write OUT/report.html.")
@click.pass_context
@handle_errors
def benchmark(ctx: click.Context, plan, out: Path, no_report: bool) -> None:
    """Run every combination of PLAN.yaml; resumable, survives failing combinations."""
    from spamask_integrate.benchmark import run_plan, summarise

    results = run_plan(plan, out, progress=not ctx.obj["quiet"], report=not no_report)
    failed = results[results["status"] == "failed"]
    summary = summarise(results)
    if not summary.empty:
        click.echo(summary.round(3).to_string())
    click.echo(f"{len(failed)} failed combination(s); results in {out}/results.csv, "
               f"summary in {out}/summary.md")


# ---------------------------------------------------------------------------------- report
@main.command(epilog="""
\b
Examples:
  spamask-integrate report out            # a run folder: after `evaluate`, say
  spamask-integrate report bench_out      # a benchmark folder
""")
@click.argument("folder", type=click.Path(path_type=Path))
@handle_errors
def report(folder: Path) -> None:
    """Rebuild FOLDER/report.html from a finished run or benchmark folder."""
    from spamask_integrate.report import write_report

    click.echo(f"wrote {write_report(folder)}")


# ------------------------------------------------------------------------------------ demo
@main.command(epilog="""
\b
Examples:
  spamask-integrate demo                  # writes ./demo_out
  spamask-integrate -q demo -o /tmp/demo --seed 1
""")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("demo_out"),
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a previous demo in OUT.")
@click.pass_context
@handle_errors
def demo(ctx: click.Context, out: Path, seed: int, overwrite: bool) -> None:
    """Whole pipeline on built-in synthetic slices (known domains, planted slice effects).

    Three slices of 1,200 spots, 5 domains; about two minutes on 2 CPU cores.
    """
    import spamask_integrate as si

    _check_out_dir(out, overwrite)
    adata = si.datasets.synthetic_slices(3, 1200, 200, 5, batch_effect=0.8, noise=1.0,
                                         marker_fold=1.8, seed=seed)
    click.echo(f"Synthetic data: {adata.n_obs} spots in 3 slices, 5 true domains "
               "(obs['ground_truth']), gene-wise slice effects.")
    result = si.run(adata, out, label_key="ground_truth", n_domains=5, k=6,
                    preprocess_kwargs={"n_top_genes": None, "n_comps": 30, "min_cells": 5},
                    scib_max_spots=1500, epochs=150, seed=seed, quiet=bool(ctx.obj["quiet"]))
    _print_scores(si.metrics_table(result), out)


if __name__ == "__main__":  # pragma: no cover
    main()
