"""Read spatial slices from several formats into one AnnData, validate them, write files atomically.

Reads: ``.h5ad``; a 10x Visium output folder; a 10x ``.h5`` plus a coordinates CSV; a counts
CSV/TSV (spots x genes) plus a coordinates CSV. Writes nothing on failure.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .config import Keys
from .errors import InputError

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".csv", ".tsv")
_COORD_PAIRS = (
    ("x", "y"),
    ("pxl_col_in_fullres", "pxl_row_in_fullres"),
    ("imagecol", "imagerow"),
    ("col", "row"),
    ("array_col", "array_row"),
)


@dataclass(frozen=True)
class SliceSource:
    """One slice to read: its file or folder, an optional coordinates file, name and platform."""

    path: Path
    name: str
    coordinates: Path | None = None
    platform: str | None = None
    label_key: str | None = None
    slice_column: str | None = None


# ---------------------------------------------------------------------------- atomic writing
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    A crash or Ctrl-C inside the block deletes the temporary file, so ``path`` is either the old
    file (or absent) or the complete new one, never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def remove_stale_parts(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left beside ``path``.

    Only a process killed outright (SIGKILL, power loss) leaves one behind; the next writer of
    the same file (a resumed training job, say) calls this so they do not pile up.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*.part{path.suffix}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------- sources
def _as_sources(sources: Any) -> list[SliceSource]:
    """Turn a manifest path, a list of paths, tuples or dicts into :class:`SliceSource` objects."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not isinstance(sources, Sequence) or len(sources) == 0:
        raise InputError("no slices given: pass a list of paths or a manifest file")
    if len(sources) == 1 and isinstance(sources[0], (str, os.PathLike)) \
            and _is_manifest(Path(sources[0])):
        return _read_manifest(Path(sources[0]))
    out = []
    for item in sources:
        if isinstance(item, SliceSource):
            out.append(item)
        elif isinstance(item, dict):
            out.append(_source_from_row(item, base=Path.cwd(), where="source list"))
        elif isinstance(item, tuple):
            path, coords = item
            out.append(SliceSource(Path(path), _default_name(Path(path)), Path(coords)))
        else:
            out.append(SliceSource(Path(item), _default_name(Path(item))))
    return out


def _default_name(path: Path) -> str:
    name = path.name
    for suffix in (".h5ad", ".h5", ".csv.gz", ".tsv.gz", ".csv", ".tsv", ".txt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_manifest(path: Path) -> bool:
    """YAML files are manifests; a CSV/TSV is one if its header has a ``path`` column."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return True
    if suffix not in MANIFEST_SUFFIXES or not path.is_file():
        return False
    try:
        with open(path) as fh:
            header = fh.readline()
    except OSError:
        return False
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    return "path" in [c.strip().strip('"') for c in header.split(sep)]


def _read_manifest(path: Path) -> list[SliceSource]:
    if not path.is_file():
        raise InputError(f"{path}: manifest file not found")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
            rows = data.get("slices", data) if isinstance(data, dict) else data
        else:
            sep = "\t" if path.suffix.lower() == ".tsv" else ","
            rows = pd.read_csv(path, sep=sep, dtype=str).to_dict("records")
    except Exception as exc:  # yaml.YAMLError, pandas ParserError, UnicodeDecodeError
        raise InputError(f"{path}: cannot parse manifest ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: manifest lists no slices (expected rows with a 'path' column)")
    return [_source_from_row(row, base=path.parent, where=f"{path} row {i + 1}")
            for i, row in enumerate(rows)]


def _source_from_row(row: Any, *, base: Path, where: str) -> SliceSource:
    if isinstance(row, str):
        row = {"path": row}
    if not isinstance(row, dict) or not row.get("path") or pd.isna(row.get("path")):
        raise InputError(f"{where}: missing 'path'")
    clean = {k: (None if (v is None or (isinstance(v, float) and np.isnan(v))) else v)
             for k, v in row.items()}

    def resolve(p: Any) -> Path | None:
        if p is None:
            return None
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() else base / p

    path = resolve(clean["path"])
    name = clean.get("slice") or clean.get("name") or _default_name(path)
    return SliceSource(path, str(name), resolve(clean.get("coordinates")),
                       clean.get("platform"), clean.get("label_key"), clean.get("slice_column"))


# ---------------------------------------------------------------------------- readers
def _read_one(src: SliceSource, rows: tuple[str, Collection[str]] | None = None) -> ad.AnnData:
    """One source file; with ``rows = (column, values)`` only the spots whose ``obs[column]``
    is one of ``values`` (an h5ad is then read in backed mode, loading only those rows)."""
    path = src.path
    if not path.exists():
        raise InputError(f"{path}: file not found (slice {src.name!r})")
    try:
        if path.is_dir():
            adata = _read_visium_dir(path)
        elif path.name.lower().endswith(".h5ad"):
            adata = ad.read_h5ad(path) if rows is None else _read_h5ad_rows(path, *rows)
            if Keys.COUNTS in adata.layers:
                adata.X = adata.layers[Keys.COUNTS]
        elif path.suffix.lower() == ".h5":
            import scanpy as sc

            adata = sc.read_10x_h5(path)
        elif path.name.lower().endswith((".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz")):
            sep = "\t" if ".tsv" in path.name.lower() or path.suffix == ".txt" else ","
            table = pd.read_csv(path, sep=sep, index_col=0)
            adata = ad.AnnData(sp.csr_matrix(table.to_numpy(dtype=np.float32)),
                               obs=pd.DataFrame(index=table.index.astype(str)),
                               var=pd.DataFrame(index=table.columns.astype(str)))
        else:
            raise InputError(f"{path}: unknown format (use .h5ad, a Visium folder, .h5 or .csv/.tsv)")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from exc
    if src.coordinates is not None:
        _attach_coordinates(adata, src.coordinates)
    elif Keys.SPATIAL not in adata.obsm and not path.is_dir():
        guess = _guess_coordinates(path)
        if guess is not None:
            _attach_coordinates(adata, guess)
    return adata


def _read_h5ad_rows(path: Path, column: str, values: Collection[str]) -> ad.AnnData:
    """The spots of an h5ad whose ``obs[column]`` is in ``values``, reading from the file only
    their rows of the counts (``layers["counts"]`` if present, else ``X``), ``obs``, ``var`` and
    ``obsm["spatial"]``: a rank of a sharded run holds its share of an atlas, not the atlas."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        obs = read_elem(f["obs"])
        slices = slice_categories(obs, column, str(path))
        keep = np.flatnonzero(np.isin(np.asarray(slices.astype(str)), list(values)))
        x_elem = f["layers"][Keys.COUNTS] if "layers" in f and Keys.COUNTS in f["layers"] \
            else f["X"]
        adata = ad.AnnData(_rows_of(x_elem, keep), obs=obs.iloc[keep].copy(),
                           var=read_elem(f["var"]))
        if "obsm" in f and Keys.SPATIAL in f["obsm"]:
            adata.obsm[Keys.SPATIAL] = np.asarray(read_elem(f["obsm"][Keys.SPATIAL]))[keep]
    return adata


def _rows_of(elem, rows: np.ndarray):
    """Rows ``rows`` (sorted) of a stored matrix, read as runs of consecutive rows."""
    import h5py

    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if rows.size else []
    if isinstance(elem, h5py.Dataset):  # dense
        return np.concatenate([elem[r[0]:r[-1] + 1] for r in runs]) if runs else \
            np.zeros((0, elem.shape[1]), dtype=elem.dtype)
    encoding = elem.attrs.get("encoding-type", "")
    shape = tuple(elem.attrs["shape"])
    if encoding != "csr_matrix":  # CSC: column-major, whole matrix then rows
        from anndata.io import read_elem

        return sp.csr_matrix(read_elem(elem))[rows]
    indptr = elem["indptr"][:]
    data, indices, ptr = [], [], [np.zeros(1, dtype=np.int64)]
    for r in runs:
        lo, hi = int(indptr[r[0]]), int(indptr[r[-1] + 1])
        data.append(elem["data"][lo:hi])
        indices.append(elem["indices"][lo:hi])
        ptr.append(indptr[r[0] + 1:r[-1] + 2].astype(np.int64) - lo + ptr[-1][-1])
    if not runs:
        return sp.csr_matrix((0, shape[1]), dtype=elem["data"].dtype)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(ptr)),
                         shape=(rows.size, shape[1]))


def _guess_coordinates(path: Path) -> Path | None:
    stem = _default_name(path)
    candidates = [path.parent / f"{stem}_coordinates.csv", path.parent / f"{stem}.coordinates.csv",
                  path.parent / f"{stem}_spatial.csv"]
    candidates += sorted((path.parent / "spatial").glob("tissue_positions*.csv"))
    return next((c for c in candidates if c.is_file()), None)


def _read_visium_dir(folder: Path) -> ad.AnnData:
    import scanpy as sc

    matrices = sorted(folder.glob("*filtered_feature_bc_matrix.h5"))
    if not matrices:
        raise InputError(f"{folder}: no filtered_feature_bc_matrix.h5 in this Visium folder")
    adata = sc.read_10x_h5(matrices[0])
    positions = sorted((folder / "spatial").glob("tissue_positions*.csv"))
    if not positions:
        raise InputError(f"{folder}: no spatial/tissue_positions*.csv, so no spatial coordinates")
    _attach_coordinates(adata, positions[0])
    return adata


def _read_coordinate_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: coordinates file not found")
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except Exception as exc:
        raise InputError(f"{path}: cannot read coordinates ({exc})") from exc
    if path.name.startswith("tissue_positions") and "in_tissue" not in table.columns:
        # Space Ranger < 2.0 writes tissue_positions_list.csv without a header
        table = pd.read_csv(path, header=None, names=[
            "barcode", "in_tissue", "array_row", "array_col",
            "pxl_row_in_fullres", "pxl_col_in_fullres"])
    table = table.set_index(table.columns[0])
    table.index = table.index.astype(str)
    if "in_tissue" in table.columns:
        table = table[table["in_tissue"].astype(int) == 1]
    return table


def _attach_coordinates(adata: ad.AnnData, path: Path) -> None:
    table = _read_coordinate_table(path)
    pair = next((p for p in _COORD_PAIRS if set(p) <= set(table.columns)), None)
    if pair is None:
        numeric = table.select_dtypes("number").columns
        if len(numeric) != 2:
            raise InputError(f"{path}: cannot find coordinate columns (name them 'x' and 'y')")
        pair = tuple(numeric)
    missing = adata.obs_names.difference(table.index)
    keep = adata.obs_names.isin(table.index)
    if keep.sum() == 0:
        raise InputError(f"{path}: no barcode matches the counts ({len(missing)} unmatched)")
    if "in_tissue" not in table.columns and len(missing):
        raise InputError(f"{path}: {len(missing)} spots have no coordinates, e.g. {missing[0]!r}")
    adata._inplace_subset_obs(keep)
    table = table.loc[adata.obs_names]
    for col in ("array_row", "array_col"):
        if col in table.columns:
            adata.obs[col] = table[col].to_numpy()
    adata.obsm[Keys.SPATIAL] = table[list(pair)].to_numpy(dtype=np.float64)


# ---------------------------------------------------------------------------- validation
def _validate_slice(adata: ad.AnnData, src: SliceSource, *, min_spots: int,
                    label_key: str | None) -> None:
    where = f"{src.path} (slice {src.name!r})"
    if adata.n_obs == 0:
        raise InputError(f"{where}: the slice is empty")
    if adata.n_obs < min_spots:
        raise InputError(
            f"{where}: only {adata.n_obs} spots, fewer than the {min_spots} needed for the "
            "neighbour graph; drop the slice or lower the neighbour count")
    if Keys.SPATIAL not in adata.obsm:
        raise InputError(f"{where}: obsm['spatial'] is missing and no coordinates CSV was given; "
                         "add coordinates or a 'coordinates' column in the manifest")
    coords = np.asarray(adata.obsm[Keys.SPATIAL])
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(f"{where}: obsm['spatial'] has shape {coords.shape}, expected (n_spots, 2)")
    if not np.issubdtype(coords.dtype, np.number) or not np.isfinite(coords).all():
        raise InputError(f"{where}: obsm['spatial'] holds NaN or infinite coordinates")
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    if values.size and not np.isfinite(values).all():
        raise InputError(f"{where}: counts contain NaN or infinite values")
    if values.size and values.min() < 0:
        raise InputError(f"{where}: counts contain negative values (raw counts expected)")
    dup = adata.obs_names[adata.obs_names.duplicated()]
    if len(dup):
        raise InputError(f"{where}: {len(dup)} duplicated barcodes, e.g. {dup[0]!r}")
    key = src.label_key or label_key
    if key is not None and key not in adata.obs.columns:
        raise InputError(f"{where}: label column obs[{key!r}] not found "
                         f"(columns: {', '.join(map(str, adata.obs.columns[:10])) or 'none'})")


# ---------------------------------------------------------------------------- public API
def read_slices(
    sources: Any,
    batch_key: str = Keys.BATCH,
    label_key: str | None = None,
    *,
    slice_column: str | None = None,
    join: str = "inner",
    min_spots: int = 7,
    select: Collection[str] | None = None,
    counts_layer: bool = True,
) -> ad.AnnData:
    """Read one or several slices into one AnnData.

    Parameters
    ----------
    sources
        A list of paths (``.h5ad``, Visium folders, ``.h5`` or counts CSV/TSV with a coordinates
        CSV beside them named ``<stem>_coordinates.csv``), ``(counts, coordinates)`` tuples or
        dicts, or one manifest file (YAML or CSV) with a row per slice: ``path``, optional
        ``slice``, ``coordinates``, ``platform``, ``label_key``, ``slice_column``.
    batch_key
        ``obs`` column that receives the slice names (categorical, input order).
    label_key
        Optional ground-truth column; every slice must have it (a manifest's ``label_key``
        column may name a different column per slice; it is renamed to ``label_key``,
        or ``"label"``).
    slice_column
        An ``obs`` column that splits each file into slices (an atlas in one h5ad with a
        ``sample`` column): every value becomes a slice named by the value, in the order of
        the column's categories (else of first appearance). A manifest row's own
        ``slice_column`` wins over this one.
    join
        ``"inner"`` keeps the genes shared by all slices; ``"outer"`` keeps all, zero-filled.
    min_spots
        Slices with fewer spots raise (the neighbour graph needs ``k + 1`` spots).
    select
        Read only the slices of these names (a rank of a sharded run): other files are not
        opened, and of a file split by a slice column only the selected rows are loaded.
    counts_layer
        Also keep a copy of the counts in ``layers["counts"]`` (``X`` is then free to be
        normalised in place). ``False`` keeps them in ``X`` only: one copy instead of two, for
        a read that goes straight to :func:`~spamask_integrate.preprocess` (as ``run`` does).

    Returns
    -------
    AnnData with raw counts in ``X`` and (unless ``counts_layer=False``) ``layers["counts"]``
    (CSR), ``obsm["spatial"]``,
    ``obs[batch_key]``, obs names ``<slice>_<barcode>``, the ``var`` columns on which all
    slices agree (e.g. 10x ``gene_ids``) and ``uns["spamask"]["read"]``.
    """
    if join not in ("inner", "outer"):
        raise InputError(f"join={join!r}: use 'inner' or 'outer'")
    files = _as_sources(sources)
    out_label = label_key or ("label" if any(s.label_key for s in files) else None)
    srcs: list[SliceSource] = []
    slices = []
    for file in files:
        column = file.slice_column or slice_column
        if select is not None and not column and file.name not in select:
            continue
        adata = _read_one(file, rows=(column, select) if column and select is not None else None)
        parts = _split_by_column(adata, file, column) if column else [(file, adata)]
        del adata
        for src, part in parts:
            if select is not None and src.name not in select:
                continue
            _validate_slice(part, src, min_spots=min_spots, label_key=label_key)
            srcs.append(src)
            slices.append(_normalise_slice(part, src, batch_key=batch_key, out_label=out_label,
                                           label_key=src.label_key or label_key))
    names = [s.name for s in srcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"duplicated slice name(s): {', '.join(dup)}; give each slice its own name")
    joined = _join_slices(slices, srcs, batch_key=batch_key, join=join, label_key=out_label,
                          counts_layer=counts_layer)
    joined.uns[Keys.UNS]["read"]["slice_column"] = ",".join(sorted(
        {f.slice_column or slice_column for f in files} - {None}))
    return joined


def _split_by_column(adata: ad.AnnData, src: SliceSource,
                     column: str) -> list[tuple[SliceSource, ad.AnnData]]:
    """One (source, AnnData) per value of ``obs[column]`` of a file holding many slices."""
    slices = slice_categories(adata.obs, column, str(src.path))
    parts = []
    for i, value in enumerate(slices.categories):
        sub = SliceSource(src.path, str(value), None, src.platform, src.label_key, column)
        parts.append((sub, adata[slices.codes == i].copy()))
    logger.info("%s: %d slices by obs[%r]", src.path, len(parts), column)
    return parts


def slice_categories(obs: pd.DataFrame, column: str, where: str) -> pd.Categorical:
    """``obs[column]`` as every spot's slice: a categorical whose categories are the values
    present, in their categorical order if the column is categorical, else in order of first
    appearance. Errors name ``where`` (a file, or "the AnnData given") and the column."""
    if column not in obs.columns:
        raise InputError(f"{where}: slice column obs[{column!r}] not found (columns: "
                         f"{', '.join(map(str, obs.columns[:10])) or 'none'})")
    values = obs[column]
    missing = int(values.isna().sum())
    if missing:
        raise InputError(f"{where}: slice column obs[{column!r}] is empty for {missing} "
                         "spots; give every spot its slice")
    if isinstance(values.dtype, pd.CategoricalDtype):
        present = set(values.unique())
        order = [c for c in values.cat.categories if c in present]
    else:
        order = list(pd.unique(values))
    codes = pd.Categorical(values, categories=order).codes
    return pd.Categorical.from_codes(codes, categories=[str(v) for v in order])


def _normalise_slice(adata: ad.AnnData, src: SliceSource, *, batch_key: str,
                     out_label: str | None, label_key: str | None) -> ad.AnnData:
    adata.var_names_make_unique()
    x = adata.X if sp.issparse(adata.X) else sp.csr_matrix(np.asarray(adata.X))
    x = sp.csr_matrix(x, dtype=np.float32)
    obs = adata.obs.copy()
    if label_key is not None and out_label is not None and label_key != out_label:
        obs[out_label] = obs.pop(label_key)
    obs.index = [f"{src.name}_{b}" for b in adata.obs_names]
    obs[batch_key] = src.name
    out = ad.AnnData(x, obs=obs, var=adata.var.copy())  # gene annotations (10x gene_ids...)
    out.obsm[Keys.SPATIAL] = np.asarray(adata.obsm[Keys.SPATIAL], dtype=np.float64)
    return out


def _join_slices(slices: list[ad.AnnData], srcs: list[SliceSource], *, batch_key: str,
                 join: str, label_key: str | None, counts_layer: bool = True) -> ad.AnnData:
    all_genes = set().union(*(set(s.var_names) for s in slices))
    joined = ad.concat(slices, join=join, merge="same", fill_value=0)
    if joined.n_vars == 0:
        raise InputError("the slices share no gene names: "
                         + ", ".join(f"{s.name} ({a.n_vars} genes)" for s, a in zip(srcs, slices)))
    joined.X = sp.csr_matrix(joined.X, dtype=np.float32)
    if counts_layer:
        joined.layers[Keys.COUNTS] = joined.X.copy()
    joined.obs[batch_key] = pd.Categorical(joined.obs[batch_key], categories=[s.name for s in srcs])
    if label_key is not None:
        labels = joined.obs[label_key]
        joined.obs[label_key] = labels.astype("category") if labels.dtype == object else labels
    n_dropped = len(all_genes) - joined.n_vars
    logger.info("read %d slices, %d spots; kept %d genes, dropped %d (join=%s)",
                len(srcs), joined.n_obs, joined.n_vars, n_dropped, join)
    joined.uns[Keys.UNS] = {"read": {
        "sources": [str(s.path) for s in srcs],
        "slices": [s.name for s in srcs],
        "platforms": {s.name: s.platform or "unknown" for s in srcs},
        "join": join,
        "n_genes_kept": int(joined.n_vars),
        "n_genes_dropped": int(n_dropped),
        "batch_key": batch_key,
        "label_key": label_key or "",
    }}
    return joined


# ---------------------------------------------------------------------------- outputs
def write_outputs(
    adata: ad.AnnData,
    out_dir: str | os.PathLike,
    metrics: pd.DataFrame | None = None,
    *,
    batch_key: str = Keys.BATCH,
    domain_key: str = Keys.DOMAIN,
    figures: bool = True,
    umap_rep: str | None = None,
    seed: int = 0,
    extra_files: dict[str, str] | None = None,
    report: bool = True,
) -> dict[str, Path]:
    """Write the results of a run into ``out_dir``; return the paths written.

    Files: ``domains.csv`` (spot, slice, x, y, domain), ``metrics.csv`` and ``metrics.json``
    (when ``metrics`` is given), PNG figures (``spatial_domains.png``, ``umap.png``,
    ``scores.png``), ``extra_files`` (name -> text, e.g. ``run.json``), with ``report`` the
    self-contained ``report.html`` (:mod:`spamask_integrate.report`) and, last,
    ``integrated.h5ad``: its presence means the run finished. All
    files are first written into a hidden staging folder inside ``out_dir`` and renamed into
    place only when every one of them is complete; on any failure the staging folder is
    removed, so ``out_dir`` never holds a partial result.
    """
    import json
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        xy = np.asarray(adata.obsm[Keys.SPATIAL])
        table = pd.DataFrame({"spot": adata.obs_names, "slice": adata.obs[batch_key].to_numpy(),
                              "x": xy[:, 0], "y": xy[:, 1],
                              "domain": adata.obs[domain_key].to_numpy()})
        table.to_csv(stage / "domains.csv", index=False)
        if metrics is not None:
            metrics.to_csv(stage / "metrics.csv", index=False)
            (stage / "metrics.json").write_text(
                json.dumps(metrics.to_dict(orient="records"), indent=1))
        if figures:
            _write_figures(adata, stage, metrics, batch_key, domain_key, umap_rep, seed)
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
        if report:
            from .report import REPORT_NAME, render_run_report

            (stage / REPORT_NAME).write_text(render_run_report(adata, stage, metrics),
                                             encoding="utf-8")
        adata.write_h5ad(stage / "integrated.h5ad")
        names = sorted(p.name for p in stage.iterdir() if p.name != "integrated.h5ad")
        written = {}
        for name in names + ["integrated.h5ad"]:  # integrated.h5ad last: it marks completion
            os.chmod(stage / name, 0o644)
            os.replace(stage / name, out / name)
            written[Path(name).stem] = out / name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written


def _write_figures(adata, out: Path, metrics, batch_key, domain_key, umap_rep, seed):
    from . import plot

    figs = {"spatial_domains": lambda: plot.spatial_domains(adata, domain_key, batch_key)}
    rep = umap_rep or next((k for k in (Keys.EMB_HARMONY, Keys.EMB) if k in adata.obsm), None)
    if rep is not None:
        figs["umap"] = lambda: plot.umap(adata, rep, (domain_key, batch_key), seed=seed)
    if metrics is not None and len(metrics):
        figs["scores"] = lambda: plot.scores(metrics)
    for name, make in figs.items():
        make().savefig(out / f"{name}.png", dpi=110, format="png")
