"""Streaming loaders for block-list shards (local disk, HTTP, S3, fsspec) with exact resumption,
and the shape-aware bucketing dispatcher that batches blocks of one mode across examples.

:class:`BlockDataset` is the loader (``pipeline/LOADER.md``: split, shuffle and resumption
policies, benchmark); :class:`Dispatcher` the dispatcher (``pipeline/DISPATCH.md``: queues,
buckets, token budgets, time-to-live, runners, ranks, metrics, benchmark).
"""

from .buckets import BucketSpec, buckets_from_index, estimate_buckets
from .cache import ShardCache
from .cost import cost_from_supports
from .dataset import BlockDataset, LoaderConfig
from .dispatch import Dispatcher
from .dispatch_types import (
    Batch,
    DispatchConfig,
    Finished,
    Request,
    Result,
    Step,
    generation_config,
    training_config,
)
from .errors import NotFoundError, SourceError, StateError
from .fsspec_source import FsspecSource
from .hf import hf_columns, hf_data_files, hf_features
from .mix import MixedDataset
from .opener import RemoteOpener
from .retry import RetryPolicy
from .sources import HTTPSource, RemoteConfig
from .stats import LoaderStats
from .urls import expand_braces

__all__ = [
    "BlockDataset", "LoaderConfig", "MixedDataset", "LoaderStats",
    "RemoteConfig", "RemoteOpener", "RetryPolicy", "HTTPSource", "FsspecSource", "ShardCache",
    "SourceError", "NotFoundError", "StateError", "expand_braces",
    "hf_features", "hf_data_files", "hf_columns",
    "Dispatcher", "DispatchConfig", "Batch", "Request", "Result", "Step", "Finished",
    "training_config", "generation_config", "BucketSpec", "buckets_from_index",
    "estimate_buckets", "cost_from_supports",
]
