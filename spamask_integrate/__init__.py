"""spamask-integrate: spatial domains and multi-slice integration with dual-masked graph learning."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets
from .config import Keys, SpamaskConfig
from .errors import ConfigError, DependencyError, InputError, ResourceError, SpamaskError
from .graph import build_graph, to_dgl
from .io import atomic_write, read_slices
from .cluster import cluster, refine_labels
from .context import caller_input, context_embedding
from .integrate import integrate
from .io import write_outputs
from .metrics import evaluate, metrics_table
from .pipeline import run
from .preprocess import preprocess
from .train import SpaMask, SpaMaskEnsemble, train
from .utils import enable_compile_cache

try:
    __version__ = version("spamask-integrate")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConfigError", "DependencyError", "InputError", "Keys", "ResourceError", "SpaMask",
    "SpaMaskEnsemble",
    "SpamaskConfig", "SpamaskError", "atomic_write", "build_graph", "caller_input", "cluster",
    "context_embedding",
    "datasets",
    "enable_compile_cache", "evaluate", "integrate", "metrics_table", "preprocess",
    "read_slices", "refine_labels", "run", "to_dgl", "train", "write_outputs",
]
