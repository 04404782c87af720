"""Streaming loaders for block-list shards (local disk, HTTP, S3, fsspec) with exact resumption.

:class:`BlockDataset` is the entry point; see ``pipeline/LOADER.md`` for the split, shuffle and
resumption policies and the benchmark.
"""

from .cache import ShardCache
from .dataset import BlockDataset, LoaderConfig
from .errors import NotFoundError, SourceError, StateError
from .mix import MixedDataset
from .opener import RemoteOpener
from .retry import RetryPolicy
from .sources import FsspecSource, HTTPSource, RemoteConfig
from .stats import LoaderStats
from .urls import expand_braces

__all__ = [
    "BlockDataset", "LoaderConfig", "MixedDataset", "LoaderStats",
    "RemoteConfig", "RemoteOpener", "RetryPolicy", "HTTPSource", "FsspecSource", "ShardCache",
    "SourceError", "NotFoundError", "StateError", "expand_braces",
]
