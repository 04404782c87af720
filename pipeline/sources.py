"""Remote byte sources for the format's ``ByteSource``/``Opener`` plug point: HTTP(S), S3, fsspec.

Every read is a range request for exactly the bytes the index points at (one request per sample or
run of samples). Reads time out instead of hanging, retry transient failures with backoff
(:mod:`blocklm.pipeline.retry`) and resume at the first byte not yet received: byte-exact over
HTTP, to ``chunk_bytes`` over fsspec/S3 (each chunk is one ranged request). Clients (kept-alive
``http.client`` connections per thread, :mod:`.httpconn`, with a ``requests.Session`` for
redirects; an ``s3fs`` filesystem) are made lazily, per process, so an opener can be pickled into
DataLoader workers.
"""

from __future__ import annotations

import http.client
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from blocklm.formats.errors import TruncatedShardError

from .errors import NotFoundError, SourceError
from .httpconn import Connections
from .retry import Attempts, RetryPolicy

MAX_REQUEST_BYTES = 64 << 20  # one HTTP read call never asks urllib3 for more than this


@dataclass(frozen=True)
class RemoteConfig:
    """How remote shards are reached. Everything is explicit: no environment variables.

    ``timeout`` bounds connecting and every wait for the next bytes. ``s3_endpoint_url``,
    ``s3_key``/``s3_secret`` (or ``s3_anon``) configure ``s3://``; ``storage_options`` go to
    ``fsspec.filesystem`` for any other protocol. ``cache_dir`` with ``cache_bytes`` > 0 keeps whole
    remote files in an LRU cache on local disk (:mod:`blocklm.pipeline.cache`).
    """

    timeout: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    chunk_bytes: int = 8 << 20
    s3_endpoint_url: str | None = None
    s3_key: str | None = None
    s3_secret: str | None = None
    s3_anon: bool = False
    s3_region: str = "us-east-1"
    storage_options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    cache_bytes: int = 0


class HTTPSource:
    """A :class:`ByteSource` over an HTTP(S) URL, read with ``Range`` requests (over ``conns``,
    kept-alive ``http.client`` connections, when given; else, and for redirects, ``session``)."""

    def __init__(self, url: str, config: RemoteConfig, session: Callable[[], Any],
                 on_retry: Callable[[], None] | None = None,
                 conns: Callable[[], Connections] | None = None) -> None:
        self.name = self.url = url
        self.config = config
        self._session = session
        self._conns = conns  # http.client connections for range reads (else requests)
        self._size: int | None = None
        self.retries = 0  # transient failures retried, for the loader's stats
        self._on_retry = on_retry

    def _transient(self) -> tuple[type[BaseException], ...]:
        import requests
        import urllib3

        return (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, _Transient)

    def _status(self, r: Any, offset: int) -> None:
        code = r.status_code if hasattr(r, "status_code") else r.status
        if code in (404, 410):
            raise NotFoundError(f"HTTP {code}", shard=self.url)
        if code == 416:
            raise TruncatedShardError(f"HTTP 416: no bytes at offset {offset}", shard=self.url)
        if code == 429 or code >= 500:
            raise _Transient(f"HTTP {code}")
        if code not in (200, 206):
            raise SourceError(f"HTTP {code}", shard=self.url)

    def _check(self, code: int, headers: Any, start: int) -> None:
        """The answer to ``Range: bytes=start-`` holds the bytes from ``start``, unencoded."""
        if code == 200 and start != 0:
            raise SourceError("server ignored the Range header (HTTP 200)", shard=self.url)
        if code == 206:
            cr = headers.get("Content-Range", "")
            if not cr.startswith(f"bytes {start}-"):
                raise SourceError(f"Content-Range {cr!r} does not start at {start}",
                                  shard=self.url)
        enc = headers.get("Content-Encoding", "identity").strip().lower()
        if enc not in ("", "identity"):
            raise SourceError(f"server sent Content-Encoding {enc!r} although "
                              "asked for identity", shard=self.url)

    def _short(self, headers: Any, offset: int, length: int, got: int, before: int) -> None:
        """The body ended after ``got`` of ``length`` bytes: past the end of the file, or cut."""
        total = headers.get("Content-Range", "").rpartition("/")[2]
        if total.isdigit() and int(total) < offset + length:
            raise TruncatedShardError(f"wanted {length} bytes at offset {offset}, file has "
                                      f"{total}", shard=self.url)
        raise _Transient(f"connection ended after {got - before} bytes")

    def size(self) -> int:
        if self._size is None:
            att = Attempts(self.config.retry)
            while True:
                try:
                    r = self._head()
                    self._status(r, 0)
                    n = r.headers.get("Content-Length")
                    if n is None or not n.isdigit():
                        raise SourceError("no Content-Length in HEAD response", shard=self.url)
                    self._size = int(n)
                    break
                except self._transient() as e:
                    self._retry_or_raise(att, False, 0, e)
        return self._size

    def _head(self) -> Any:
        """The answer to ``HEAD url``, on the kept-alive connection the reads use (redirects
        followed through requests)."""
        if self._conns is not None:
            conns = self._conns()
            r, key = conns.get(self.url, {"Accept-Encoding": "identity"}, self.config.timeout,
                               method="HEAD")
            r.read()  # a HEAD answer has no body: this only marks the connection reusable
            if not 300 <= r.status < 400:
                return r
            conns.drop(key)
        return self._session().head(self.url, timeout=self.config.timeout, allow_redirects=True)

    def _retry_or_raise(self, att: Attempts, progressed: bool, done: int, e: BaseException) -> None:
        if not att.failed(progressed, done):
            raise SourceError(f"giving up after {att.total} failures ({done} bytes received): "
                              f"{type(e).__name__}: {e}", shard=self.url) from None
        self.retries += 1
        if self._on_retry is not None:
            self._on_retry()

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; a cut connection resumes at the next missing byte."""
        if length == 0:
            return b""
        if self._conns is None:
            return self._read_requests(offset, length)
        parts: list[bytes] = []

        def body(r: Any, key: Any, got: int) -> int:
            # one read of the whole rest: bytes straight from the socket, no copy after; a body
            # cut short returns what arrived, and the next request starts after it
            data = r.read(length - got)
            parts.append(data)
            return len(data)

        def moved(start: int, got: int) -> None:
            parts.append(self._read_requests(start, length - got))

        self._ranged(offset, length, body, moved)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, offset: int, out: memoryview, until: int | None = None) -> None:
        """Fill ``out`` with the ``len(out)`` bytes from ``offset`` (no ``bytes`` made: the
        loader receives runs into buffers it reuses); resumes like :meth:`read`.

        ``until``: the caller will go on reading up to this offset (its next runs): the request
        asks for all of it, and the rest of the answer stays open on this thread's connection
        for the next ``readinto`` from where this one ended (no request, no round trip; the
        server keeps sending while the caller cuts)."""
        length = len(out)
        if length == 0:
            return
        if self._conns is None:
            out[:] = self._read_requests(offset, length)
            return
        conns = self._conns()
        timeout = self.config.timeout

        def body(r: Any, key: Any, got: int) -> int:
            return conns.body_into(r, key, out[got:], timeout)

        def moved(start: int, got: int) -> None:
            out[got:] = self._read_requests(start, length - got)

        self._ranged(offset, length, body, moved, until)

    def request_ahead(self, offset: int, until: int) -> None:
        """Send now the request a later ``readinto(offset, out, until)`` (with ``until`` past the
        run's end) will make, on a second connection, its answer left coming
        (:meth:`Connections.ahead`); the read takes it, any other request drops it. A failure
        here is left to that read (it asks again, with retries)."""
        if self._conns is None or until <= offset:
            return
        try:
            self._conns().ahead(self.url, {"Range": f"bytes={offset}-{until - 1}",
                                           "Accept-Encoding": "identity"}, self.config.timeout)
        except self._transient():
            pass

    def _ranged(self, offset: int, length: int, body: Callable[[Any, Any, int], int],
                moved: Callable[[int, int], None], until: int | None = None) -> None:
        """Range requests on this thread's kept-alive connection until ``length`` bytes from
        ``offset`` arrived: ``body(response, key, got)`` takes the body's bytes (returns their
        count), ``moved(start, got)`` reads the rest through ``requests`` after a redirect.
        With ``until`` past the end, the request asks up to it and the rest of the body is
        parked on the connection (:meth:`Connections.park`); a parked body that goes on from
        ``offset`` is read first."""
        got = 0
        att = Attempts(self.config.retry)
        conns = self._conns()
        last = max(offset + length, until or 0) - 1  # the last byte a request asks for
        while got < length:
            before = got
            key = None
            try:
                start = offset + got
                rk = conns.unpark(self.url, start, length - got) if until is not None else None
                if rk is None:
                    rk = conns.get(self.url, {"Range": f"bytes={start}-{last}",
                                              "Accept-Encoding": "identity"}, self.config.timeout)
                    r, key = rk
                    if 300 <= r.status < 400:  # redirects are followed by requests (rare)
                        conns.drop(key)
                        moved(start, got)
                        break
                    self._status(r, start)
                    self._check(r.status, r.headers, start)
                r, key = rk
                got += body(r, key, got)
                if got == length and r.status == 206 and last >= offset + length and r.length:
                    conns.park(self.url, offset + length, r, key)  # the next runs' bytes
                elif not r.isclosed():  # more body than asked for (an HTTP 200): not reusable
                    conns.drop(key)
                if got < length:
                    conns.drop(key)
                    self._short(r.headers, offset, length, got, before)
            except self._transient() as e:
                if key is not None:
                    conns.drop(key)
                got += getattr(e, "got", 0)  # a body cut short: what arrived counts
                self._retry_or_raise(att, got > before, got, getattr(e, "cause", e))
            except BaseException:
                if key is not None:
                    conns.drop(key)
                raise

    def _read_requests(self, offset: int, length: int) -> bytes:
        """:meth:`read` through ``requests`` (follows redirects)."""
        parts: list[bytes] = []
        got = 0
        att = Attempts(self.config.retry)
        while got < length:
            before = got
            try:
                start, end = offset + got, offset + length - 1
                with self._session().get(self.url, stream=True, timeout=self.config.timeout,
                                         headers={"Range": f"bytes={start}-{end}",
                                                  "Accept-Encoding": "identity"}) as r:
                    self._status(r, start)
                    self._check(r.status_code, r.headers, start)
                    while got < length:
                        # the body is the bytes themselves (checked above): urllib3's decoding
                        # layer would only buffer and copy them once more
                        chunk = r.raw.read(min(length - got, MAX_REQUEST_BYTES),
                                           decode_content=False)
                        if not chunk:
                            break
                        parts.append(chunk)
                        got += len(chunk)
                    if got < length:
                        self._short(r.headers, offset, length, got, before)
            except self._transient() as e:
                self._retry_or_raise(att, got > before, got, e)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def open(self) -> BinaryIO:
        return io.BufferedReader(_SequentialReader(self), buffer_size=1 << 20)


class _Transient(Exception):
    """An HTTP answer worth retrying (5xx, 429, a body cut short)."""


class _SequentialReader(io.RawIOBase):
    """A sequential stream over a source's range reads (for scanning a shard without an index)."""

    def __init__(self, src: Any) -> None:  # an HTTPSource or FsspecSource
        self.src = src
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.src.size() - self.pos)
        if n <= 0:
            return 0
        data = self.src.read(self.pos, n)
        b[:n] = data
        self.pos += n
        return n


def __getattr__(name: str) -> Any:
    # RemoteOpener lived here first and is imported from here elsewhere (tools/dataset_open.py);
    # it moved to .opener, which imports this module, so it is re-exported lazily.
    if name == "RemoteOpener":
        from .opener import RemoteOpener

        return RemoteOpener
    if name == "FsspecSource":  # moved to .fsspec_source (this file's size)
        from .fsspec_source import FsspecSource

        return FsspecSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
