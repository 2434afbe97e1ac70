"""Small shared helpers: AnnData key checks and recording parameters in ``uns``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from .config import Keys
from .errors import InputError


def require_obs(adata: ad.AnnData, key: str, *, categorical: bool = True) -> None:
    """Raise :class:`InputError` unless ``obs[key]`` exists; make it categorical if asked."""
    if key not in adata.obs.columns:
        raise InputError(f"obs[{key!r}] not found (columns: "
                         f"{', '.join(map(str, adata.obs.columns[:12])) or 'none'})")
    if categorical and not isinstance(adata.obs[key].dtype, pd.CategoricalDtype):
        adata.obs[key] = adata.obs[key].astype(str).astype("category")


def require_obsm(adata: ad.AnnData, key: str, hint: str = "") -> None:
    """Raise :class:`InputError` unless ``obsm[key]`` exists."""
    if key not in adata.obsm:
        have = ", ".join(adata.obsm.keys()) or "none"
        raise InputError(f"obsm[{key!r}] not found (have: {have}){'; ' + hint if hint else ''}")


def h5ad_safe(value: Any) -> Any:
    """Convert ``value`` into something ``anndata.write_h5ad`` accepts (no None, no tuples)."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [h5ad_safe(v) for v in value]
        if items and all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
            return np.asarray(items)
        if items and all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object)
        return {str(i): v for i, v in enumerate(items)} if items else np.asarray([])
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def record(adata: ad.AnnData, step: str, params: dict[str, Any]) -> None:
    """Store ``params`` under ``uns["spamask"][step]`` in an h5ad-writable form."""
    adata.uns.setdefault(Keys.UNS, {})[step] = h5ad_safe(params)


def batch_codes(adata: ad.AnnData, batch_key: str) -> np.ndarray:
    """Integer code of each spot's slice (0..n_slices-1), in category order."""
    require_obs(adata, batch_key)
    return adata.obs[batch_key].cat.codes.to_numpy().astype(np.int64)


def release_freed_memory() -> None:
    """Give memory that Python has freed back to the operating system (glibc only; elsewhere
    nothing happens).

    glibc serves blocks below its mmap threshold (which grows up to 32 MB as large blocks are
    freed) from its heap and keeps them after they are freed. The per-slice matrices of a read
    or the blocks of the gene statistics then stay in the resident set: 1.2 GB of a 3.2 GB
    sharded rank at 10^6 spots (``benchmarks/README.md``). ``malloc_trim`` returns them; the
    run calls it between its steps."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to trim
        pass


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, distances) of every point's ``k`` nearest points, itself first: an exact
    scikit-learn search (more neighbours than points raises ``ValueError``). The report's
    UMAP and scib's kBET use it instead of pynndescent, whose numba kernels compile afresh in
    every process (about 30 s on 2 cores)."""
    from sklearn.neighbors import NearestNeighbors

    dist, ind = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return ind, dist


def numpy_blas() -> str:
    """numpy's BLAS and the kernels it runs, e.g. ``"openblas 0.3.23.dev SkylakeX"``, read with
    threadpoolctl. The kernel family changes the rounding of every numpy product, so runs
    record it beside the package versions; the command line chooses it from the CPU
    (``cli/blas.py``, ``OPENBLAS_CORETYPE``)."""
    info = _numpy_blas_info()
    return " ".join(str(info[k]) for k in ("internal_api", "version", "architecture")
                    if info.get(k)) or "unknown"


def blas_threads() -> int:
    """How many threads numpy's BLAS runs now (its current limit, which OMP_NUM_THREADS,
    OPENBLAS_NUM_THREADS or threadpoolctl set; at least 1). Steps that run independent numpy
    work side by side use this many Python threads, so a user's thread limit holds there too."""
    return max(1, int(_numpy_blas_info().get("num_threads") or 1))


def _numpy_blas_info() -> dict:
    """threadpoolctl's record of the BLAS numpy loaded (empty when it finds none)."""
    from threadpoolctl import threadpool_info

    return next((info for info in threadpool_info() if info.get("user_api") == "blas"
                 and "numpy" in str(info.get("filepath", ""))), {})


def default_cache_dir() -> Path:
    """``$SPAMASK_CACHE_DIR``, else ``$XDG_CACHE_HOME/spamask-integrate``, else
    ``~/.cache/spamask-integrate``."""
    import os

    if os.environ.get("SPAMASK_CACHE_DIR"):
        return Path(os.environ["SPAMASK_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "spamask-integrate"


def enable_compile_cache(path: str | Path | None = None) -> Path | None:
    """Keep what jax and numba compile for scoring and figures on disk, under ``path/jax`` and
    ``path/numba``, so that the next process loads it instead of compiling again.

    scib-metrics' metrics are jax functions compiled for the shapes of the scored sample; in a
    fresh process that compiling costs about 20-25 s on 2 cores, in every run. umap-learn and
    pynndescent (imported by scib-metrics, and by the UMAP figure) compile about 50 numba
    kernels at import or first call and keep none of them: about 15 s more per process. With
    the cache a second run skips most of both (:func:`import_with_numba_cache`); the scores
    and figures do not change. jax keys each entry by the function, the shapes, its version
    and the machine, numba by the source file and the machine, so a stale entry is never
    used. The entries take a few MB. Every compiled jax function is kept (jax's own default
    keeps only those compiling for over a second, which leaves out nearly all of scib's).

    Process-wide, as jax's and numba's settings are: the command line calls it
    (``--cache-dir``, ``--no-cache``); from Python, call it before
    :func:`spamask_integrate.evaluate`. ``path`` defaults to :func:`default_cache_dir`. A
    cache directory already set for jax (``JAX_COMPILATION_CACHE_DIR``, or ``jax.config``) or
    numba (``NUMBA_CACHE_DIR``) is kept. Returns the directory jax uses, or ``None`` when
    ``path`` cannot be created (then nothing changes).
    """
    import os
    import sys

    base = Path(path).expanduser() if path is not None else default_cache_dir()
    jax = sys.modules.get("jax")  # once imported, jax has read its flags from the environment
    own = jax.config.jax_compilation_cache_dir if jax else os.environ.get(
        "JAX_COMPILATION_CACHE_DIR")
    ours = {"jax": None if own else base / "jax",
            "numba": None if os.environ.get("NUMBA_CACHE_DIR") else base / "numba"}
    try:
        for where in ours.values():
            if where is not None:
                where.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(own) if own else None
    if ours["numba"] is not None:
        os.environ["NUMBA_CACHE_DIR"] = str(ours["numba"])
        if "numba" in sys.modules:  # numba read its environment at import
            sys.modules["numba"].config.CACHE_DIR = str(ours["numba"])
    if own:
        return Path(own)
    target = ours["jax"]
    if jax is not None:
        jax.config.update("jax_compilation_cache_dir", str(target))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(target)
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return target


# packages whose numba kernels are compiled at their first call instead of at import (see
# import_with_numba_cache)
_LAZY_KERNELS = ("pynndescent",)


def import_with_numba_cache(name: str, lazy: tuple[str, ...] = _LAZY_KERNELS):
    """``importlib.import_module(name)``; the numba kernels that the import defines are
    cached on disk when numba has a cache directory (:func:`enable_compile_cache`, or
    ``NUMBA_CACHE_DIR``), and those of the packages in ``lazy`` compile at their first call.

    umap-learn and pynndescent (imported by scib-metrics and by the UMAP figure) define most
    of their kernels without numba's ``cache=True``, so every process compiled them again.
    During this import only, ``numba.njit`` and ``numba.jit`` default to ``cache=True``: the
    same code, compiled once per machine.

    pynndescent also declares its distance kernels with type signatures, which makes numba
    compile them at import: 17 of the 22-23 s that importing scib-metrics and umap took in a
    fresh process with an empty cache (2-core machine). Neither scib's scores, which get the
    neighbours passed in, nor the UMAP figure, which passes exact neighbours, calls them. For
    the packages in ``lazy`` the signatures are dropped: a kernel compiles at its first call,
    if any, for the types of that call. On the four DLPFC slices the scores equal those of a
    run with the cached eager kernels, value for value, and the UMAP layout is the same. A
    module imported before is returned as it is.
    """
    import importlib
    import sys
    import warnings

    if name in sys.modules:
        return sys.modules[name]
    import numba

    cache = bool(numba.config.CACHE_DIR)
    if cache:
        # a few of their kernels use global arrays, which numba cannot cache: it then
        # compiles them as before, and its warning (at their first call) is only noise
        warnings.filterwarnings("ignore", message=".*Cannot cache compiled function",
                                category=numba.NumbaWarning, module=".*(umap|pynndescent)")
    originals = numba.njit, numba.jit

    def patched(decorator):
        def wrapper(*args, **kwargs):
            if cache:
                kwargs.setdefault("cache", True)
            if not args or callable(args[0]):
                return decorator(*args, **kwargs)

            def with_signatures(func):  # njit(signatures, ...)(func)
                if func.__module__.split(".")[0] in lazy:
                    return decorator(func, **kwargs)  # compiled at its first call
                return decorator(*args, **kwargs)(func)
            return with_signatures
        return wrapper

    numba.njit, numba.jit = patched(numba.njit), patched(numba.jit)
    try:
        return importlib.import_module(name)
    finally:
        numba.njit, numba.jit = originals
