"""Kept-alive ``http.client`` connections for range reads, one per thread and server.

``requests`` costs about 0.4 ms of Python per request and reads a body at about 1 GB/s on this
machine's loopback; ``http.client`` itself takes about 0.07 ms per request and reads 1 MiB bodies
at over 3 GB/s (``HTTPResponse.read(n)`` fills one ``bytes`` of ``n`` straight from the socket).
The loader's range reads therefore go through :class:`Connections`; ``requests`` still answers
HEAD requests and follows redirects (rare, not on the per-run path).

A connection is used by one thread at a time (``http.client`` is not thread-safe): the loader's
read-ahead thread and the main thread each get their own. Nothing is read from the environment
(no proxies, no credentials), like the ``requests`` session the opener makes.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

# failures after which a kept-alive connection is simply stale (the server closed it while it
# was idle): retried once on a new connection, not counted as a transient failure
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class Connections:
    """``get(url, headers, timeout) -> (response, path)``: a GET answered on this thread's
    kept-alive connection to the URL's server. Read the response fully or call :meth:`drop`."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None

    def _pool(self) -> dict[tuple[str, str, int], http.client.HTTPConnection]:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        return pool

    def _new(self, scheme: str, host: str, port: int, timeout: float,
             ) -> http.client.HTTPConnection:
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            return _HTTPS(host, port, timeout=timeout, context=self._ssl)
        return _HTTP(host, port, timeout=timeout)

    def get(self, url: str, headers: dict[str, str], timeout: float, method: str = "GET",
            ) -> tuple[http.client.HTTPResponse, tuple[str, str, int]]:
        """Send ``GET url`` (or ``method``) with ``headers``; the response (status and headers read) and the key
        of the connection it came on. ``timeout`` bounds connecting and every wait for bytes."""
        u = urlsplit(url)
        scheme = u.scheme.lower()
        port = u.port or (443 if scheme == "https" else 80)
        key = (scheme, u.hostname or "", port)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        pool = self._pool()
        for attempt in (0, 1):
            conn = pool.get(key)
            reused = conn is not None
            if conn is None:
                conn = pool[key] = self._new(scheme, key[1], port, timeout)
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, target, headers=headers)
                return conn.getresponse(), key
            except _STALE:
                self.drop(key)
                if not reused or attempt:
                    raise
            except BaseException:
                self.drop(key)
                raise
        raise AssertionError("unreachable")

    def drop(self, key: tuple[str, str, int]) -> None:
        """Close and forget this thread's connection ``key`` (after a failure, or a response
        left unread)."""
        conn = self._pool().pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connections."""
        pool = self._pool()
        for conn in pool.values():
            conn.close()
        pool.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class _HTTP(http.client.HTTPConnection):
    """An ``HTTPConnection`` with Nagle's algorithm off, as urllib3 sets it (a small request is
    never held back behind an unacknowledged segment)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTPS(http.client.HTTPSConnection):
    """``HTTPSConnection`` with Nagle's algorithm off (see :class:`_HTTP`)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

