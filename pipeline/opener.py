"""The loaders' ``Opener``: URL -> :class:`ByteSource` for every supported scheme.

Local paths and ``file://`` give the format's :class:`LocalSource`; ``http(s)://``
:class:`HTTPSource`; ``s3://`` an :class:`FsspecSource` over ``s3fs`` configured from
:class:`RemoteConfig` only; anything else an :class:`FsspecSource` over ``fsspec.filesystem``.
With ``RemoteConfig.cache_dir`` remote files go through the :class:`ShardCache`.

Fork safety (DataLoader workers are forked): clients are made per process, and a forked child
never closes its parent's. s3fs closes a client in a ``weakref.finalize`` on the event loop of the
process that made it; in a child that loop has no thread, so the close waits out a timeout (in
whatever thread the garbage collector picked) and then closes the parent's sockets in the child,
which unregisters them from the epoll instance the two processes share. So the finalizers of the
clients made here run only in their own process, and a child keeps the copies of its parent's
clients that it inherits (:data:`_INHERITED`), unused and unclosed. fsspec's own after-fork reset
leaves its loop-creation lock as it was at the fork; :func:`_fork_hooks` resets it in the child.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from blocklm.formats.reader import ByteSource, LocalSource

from .fsspec_source import FsspecSource
from .sources import HTTPSource, RemoteConfig

_INHERITED: list[dict[str, Any]] = []  # a forked child's copies of its parent's clients
_HOOKED = False  # fsspec's lock reset registered for forked children (once per process)


def _only_in(pid: int, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, doing nothing when called in any process but ``pid``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if os.getpid() == pid else None

    return call


def _own_process_finalizers(obj: Any) -> None:
    """Re-register every ``weakref.finalize`` of ``obj`` to run only in this process (a forked
    copy of ``obj`` that becomes garbage in a child then closes nothing of the parent's)."""
    pid = os.getpid()
    for ref in weakref.getweakrefs(obj):
        fin = ref.__callback__
        if isinstance(fin, weakref.finalize) and (info := fin.detach()) is not None:
            _, fn, args, kwargs = info
            weakref.finalize(obj, _only_in(pid, fn), *args, **kwargs)


def _fork_hooks() -> None:
    """In a forked child, reset fsspec's lock: its own reset (2026.9) assigns a misspelt name
    and leaves the lock as it was at the fork, held forever if another thread was starting
    fsspec's IO loop then; the child's first fsspec call would wait on it for good."""
    global _HOOKED
    if not _HOOKED and hasattr(os, "register_at_fork"):
        import fsspec.asyn

        os.register_at_fork(after_in_child=fsspec.asyn.reset_lock)
        _HOOKED = True


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
            if self._clients:  # ... nor close the parent's (module docstring)
                _INHERITED.append(self._clients)
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
            _fork_hooks()
            fs.connect()  # the botocore client now (no request): its closing finalizer exists
            _own_process_finalizers(fs)
            return fs
        import fsspec

        _fork_hooks()
        fs = fsspec.filesystem(kind, skip_instance_cache=True, **cfg.storage_options)
        _own_process_finalizers(fs)
        return fs

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
