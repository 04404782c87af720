"""The loaders' ``Opener``: URL -> :class:`ByteSource` for every supported scheme.

Local paths and ``file://`` give the format's :class:`LocalSource`; ``http(s)://``
:class:`HTTPSource`; ``s3://`` an :class:`FsspecSource` over ``s3fs`` configured from
:class:`RemoteConfig` only; anything else an :class:`FsspecSource` over ``fsspec.filesystem``.
With ``RemoteConfig.cache_dir`` remote files go through the :class:`ShardCache`.
"""

from __future__ import annotations

import os
from typing import Any

from blocklm.formats.reader import ByteSource, LocalSource

from .fsspec_source import FsspecSource
from .sources import HTTPSource, RemoteConfig


class RemoteOpener:
    """An ``Opener`` (URL -> :class:`ByteSource`) for local paths, ``file://``, ``http(s)://``,
    ``s3://`` and any fsspec URL. Picklable; clients are rebuilt in each process.

    >>> opener = RemoteOpener(RemoteConfig(s3_endpoint_url="http://127.0.0.1:9000"))
    >>> src = opener("s3://bucket/text/shard-000000.tar")  # doctest: +SKIP
    """

    def __init__(self, config: RemoteConfig | None = None) -> None:
        self.config = config or RemoteConfig()
        self._clients: dict[str, Any] = {}
        self._pid = os.getpid()
        self._cache = None
        self.retries = 0  # retries of every source this opener made, in this process
        if self.config.cache_dir and self.config.cache_bytes > 0:
            from .cache import ShardCache

            self._cache = ShardCache(self.config.cache_dir, self.config.cache_bytes)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_clients"] = {}
        d["retries"] = 0
        return d

    def _client(self, kind: str) -> Any:
        if os.getpid() != self._pid:  # forked: never share a connection pool or event loop
            self._clients, self._pid = {}, os.getpid()
        c = self._clients.get(kind)
        if c is None:
            c = self._clients[kind] = self._make_client(kind)
        return c

    def _make_client(self, kind: str) -> Any:
        cfg = self.config
        if kind == "http":
            import requests

            s = requests.Session()
            s.trust_env = False  # no proxy or credentials from the environment
            return s
        if kind == "httpc":  # range reads: kept-alive http.client connections, per thread
            from .httpconn import Connections

            return Connections()
        if kind == "s3":
            import s3fs

            creds: dict[str, Any] = {"anon": cfg.s3_anon}
            if cfg.s3_key is not None:
                creds.update(key=cfg.s3_key, secret=cfg.s3_secret)
            fs = s3fs.S3FileSystem(
                endpoint_url=cfg.s3_endpoint_url, skip_instance_cache=True,
                client_kwargs={"region_name": cfg.s3_region},
                config_kwargs={"connect_timeout": cfg.timeout, "read_timeout": cfg.timeout,
                               "retries": {"total_max_attempts": 1}}, **creds)
            fs.retries = 1  # s3fs's own retry loop off: ours counts, backs off and is bounded
            return fs
        import fsspec

        return fsspec.filesystem(kind, skip_instance_cache=True, **cfg.storage_options)

    def remote(self, url: str) -> ByteSource:
        """The uncached source of ``url``."""
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        if scheme in ("", "file"):
            return LocalSource(url[7:] if scheme == "file" else url)
        if scheme in ("http", "https"):
            return HTTPSource(url, self.config, lambda: self._client("http"), self._note_retry,
                              conns=lambda: self._client("httpc"))
        kind = "s3" if scheme in ("s3", "s3a") else scheme
        path = url.partition("://")[2] if kind == "s3" else url
        return FsspecSource(url, path, self.config, lambda: self._client(kind), self._note_retry)

    def close_thread(self) -> None:
        """Close the calling thread's kept-alive HTTP connections (a loader's read-ahead thread
        calls it before it ends)."""
        conns = self._clients.get("httpc") if os.getpid() == self._pid else None
        if conns is not None:
            conns.close()

    def _note_retry(self) -> None:
        self.retries += 1

    def __call__(self, url: str) -> ByteSource:
        src = self.remote(url)
        if self._cache is not None and not isinstance(src, LocalSource):
            return self._cache.open(url, src)
        return src


def is_remote(url: str) -> bool:
    """True for URLs that are not local paths or ``file://``."""
    return "://" in url and not url.startswith("file://")
