"""spamask-integrate: spatial domains and multi-slice integration with dual-masked graph learning."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import datasets
from .config import Keys, SpamaskConfig
from .errors import ConfigError, DependencyError, InputError, ResourceError, SpamaskError
from .graph import build_graph, to_dgl
from .io import atomic_write, read_slices
from .preprocess import preprocess
from .train import SpaMask, train

try:
    __version__ = version("spamask-integrate")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "ConfigError", "DependencyError", "InputError", "Keys", "ResourceError", "SpamaskConfig",
    "SpaMask", "SpamaskError", "atomic_write", "build_graph", "datasets", "preprocess", "read_slices",
    "to_dgl", "train",
]
