"""Kept-alive ``http.client`` connections for range reads, one per thread and server.

``requests`` costs about 0.4 ms of Python per request and reads a body at about 1 GB/s on this
machine's loopback; ``http.client`` itself takes about 0.07 ms per request and reads 1 MiB bodies
at over 3 GB/s (``HTTPResponse.read(n)`` fills one ``bytes`` of ``n`` straight from the socket).
The loader's range reads therefore go through :class:`Connections`; ``requests`` still answers
HEAD requests and follows redirects (rare, not on the per-run path).

Bodies are received with one blocking ``recv(MSG_WAITALL)`` per run (:meth:`Connections.body_into`,
GIL released throughout), and the rest of a longer answer can be parked on its connection for
the next run (:meth:`Connections.park`): one request per stretch of neighbouring runs. The
request of the next stretch can be sent ahead on a second connection (:meth:`Connections.ahead`)
while the current stretch is still received, so its first bytes are already here when wanted.

A connection is used by one thread at a time (``http.client`` is not thread-safe): the loader's
read-ahead thread and the main thread each get their own. Nothing is read from the environment
(no proxies, no credentials), like the ``requests`` session the opener makes.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import struct
import threading
import weakref
from typing import Any
from urllib.parse import urlsplit

# failures after which a kept-alive connection is simply stale (the server closed it while it
# was idle): retried once on a new connection, not counted as a transient failure
# receive buffer of a connection: the server can send a whole run (and the next, of the same
# request) while the reader cuts, instead of waiting for every 64-128 KB the reader takes (a new
# connection's autotuned buffer starts at 128 KiB; a 2 MiB body then took 3.3 ms instead of 1.5
# here). The kernel caps it at net.core.rmem_max.
RCVBUF = 4 << 20
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class PartialBody(OSError):
    """A body read failed after ``got`` bytes (a transient failure, like ``cause``)."""

    def __init__(self, got: int, cause: OSError) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.got, self.cause = got, cause


class Connections:
    """``get(url, headers, timeout) -> (response, path)``: a GET answered on this thread's
    kept-alive connection to the URL's server. Read the response fully or call :meth:`drop`."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        # every thread's connections, so that they are closed when this object goes (a
        # thread's own are otherwise only dropped with its thread-local data, unclosed)
        self._all: weakref.WeakSet = weakref.WeakSet()

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
            conn = _HTTPS(host, port, timeout=timeout, context=self._ssl)
        else:
            conn = _HTTP(host, port, timeout=timeout)
        self._all.add(conn)
        return conn

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
        self._unpark()  # a body left open for a later read is not wanted now
        r = self._take_ahead(key, target, headers, method)
        if r is not None:
            return r, key
        for attempt in (0, 1):
            conn = pool.get(key)
            reused = conn is not None
            if conn is None:
                conn = pool[key] = self._new(scheme, key[1], port, timeout)
            conn.timeout = timeout
            if conn.sock is not None and conn.sock.gettimeout() != timeout:
                conn.sock.settimeout(timeout)  # (a body read blocking leaves it so)
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

    def ahead(self, url: str, headers: dict[str, str], timeout: float) -> None:
        """Send ``GET url`` with ``headers`` now, on this thread's connection to the server if
        it is idle, else on a second one (kept as a spare), and leave its answer unread: the next :meth:`get` of the same request takes it (its bytes are
        already under way), any other drops it. At most one request ahead per thread.

        Why: over loopback a server that is asked for a long range keeps the CPU for
        milliseconds, and the first bytes of a new request's answer then came 1-2 ms late (the
        woken reader waits behind the sender; measured: 256 KiB of an 8 MiB range in 1.1 ms,
        of a 256 KiB range in 0.13 ms). Sent while the previous stretch is still received,
        the answer is in the socket's buffer by the time it is wanted."""
        u = urlsplit(url)
        scheme = u.scheme.lower()
        port = u.port or (443 if scheme == "https" else 80)
        key = (scheme, u.hostname or "", port)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._drop_ahead()
        pool = self._pool()
        conn = pool.get(key)
        if conn is None or getattr(self._local, "parked", None) is not None:
            # the thread's connection still carries a body: a second one (kept as the spare)
            conn = self._spares().pop(key, None) or self._new(scheme, key[1], port, timeout)
        conn.timeout = timeout
        if conn.sock is not None and conn.sock.gettimeout() != timeout:
            conn.sock.settimeout(timeout)
        try:
            conn.request("GET", target, headers=headers)
        except BaseException:
            self._close(key, conn)  # only a head start: the read itself asks again
            raise
        self._local.ahead = (key, target, sorted(headers.items()), conn)

    def _spares(self) -> dict[tuple[str, str, int], http.client.HTTPConnection]:
        spares = getattr(self._local, "spares", None)
        if spares is None:
            spares = self._local.spares = {}
        return spares

    def _take_ahead(self, key: tuple[str, str, int], target: str, headers: dict[str, str],
                    method: str) -> http.client.HTTPResponse | None:
        """The answer of the request sent ahead if it is this one (its connection becomes the
        thread's for ``key``, the previous one the spare); else None, the request ahead
        dropped. A connection found closed is not a failure (a fresh request follows)."""
        a = getattr(self._local, "ahead", None)
        if a is None:
            return None
        self._local.ahead = None
        akey, atarget, aheaders, conn = a
        if method != "GET" or (akey, atarget, aheaders) != (key, target, sorted(headers.items())):
            self._close(akey, conn)
            return None
        try:
            r = conn.getresponse()
        except _STALE:
            self._close(key, conn)
            return None
        except BaseException:
            self._close(key, conn)
            raise
        pool = self._pool()
        old = pool.get(key)
        if old is not conn:  # it came on the spare: that is the thread's connection now
            pool[key] = conn
            if old is not None:
                spare = self._spares().pop(key, None)
                if spare is not None:
                    spare.close()
                self._spares()[key] = old
        return r

    def _close(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        """Close ``conn`` (with an unread answer), forgotten if it is the thread's for ``key``."""
        if self._pool().get(key) is conn:
            self.drop(key)
        else:
            conn.close()

    def _drop_ahead(self) -> None:
        a = getattr(self._local, "ahead", None)
        if a is not None:
            self._local.ahead = None
            self._close(a[0], a[3])

    def body_into(self, r: http.client.HTTPResponse, key: tuple[str, str, int],
                  out: memoryview, timeout: float) -> int:
        """Read up to ``len(out)`` bytes of the body of ``r`` (answered on connection ``key``)
        into ``out``; the count received (fewer when the body is shorter or was cut). The
        response is marked done when its whole body was read; else read the rest or drop it.

        Over plain HTTP the bytes after those ``http.client`` already buffered come with one
        blocking ``recv(MSG_WAITALL)``: a single system call for the whole range, with the GIL
        released throughout (``HTTPResponse.readinto`` takes it back for every few KB the
        socket hands over, and waits up to the 5 ms switch interval each time while another
        thread is cutting samples). ``SO_RCVTIMEO`` bounds every wait for bytes, like the
        socket timeout does elsewhere."""
        want = len(out) if r.length is None else min(len(out), r.length)
        conn = self._pool().get(key)
        sock = conn.sock if conn is not None else None
        if r.chunked or r.length is None or sock is None or isinstance(sock, ssl.SSLSocket):
            return r.readinto(out[:want])
        got = 0
        if not getattr(r, "_blocklm_raw", False) and want:
            # what http.client holds already (if none, it waits for the body's first bytes,
            # under the socket's timeout); readinto1 of no more than that reads nothing more
            have = len(r.fp.peek(0))
            got = r.fp.readinto1(out[:min(want, have)]) if have else 0
            # fewer than asked: its buffer is empty now, and stays so (the rest of this body
            # is read from the socket only)
            r._blocklm_raw = got < want
        if got < want and r._blocklm_raw:
            if sock.gettimeout() is not None:  # once per answer (the next request resets it)
                sec = max(timeout, 0.001)  # 0 would mean no timeout at all
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                struct.pack("ll", int(sec), int(sec % 1 * 1e6)))
                sock.settimeout(None)  # blocking: MSG_WAITALL waits for all of it in the kernel
            try:
                while got < want:
                    n = sock.recv_into(out[got:want], want - got, socket.MSG_WAITALL)
                    if n == 0:  # the server closed the connection
                        break
                    got += n
            except OSError as e:
                # SO_RCVTIMEO passed without a byte (EAGAIN), or the connection failed: the
                # bytes that did arrive count (the retry resumes after them)
                cause = TimeoutError(f"no bytes for {timeout} s") \
                    if isinstance(e, BlockingIOError) else e
                raise PartialBody(got, cause) from None
        r.length -= got
        if r.length == 0:
            r.read()  # no bytes left: marks the response done, the connection reusable
        return got

    def park(self, url: str, offset: int, r: http.client.HTTPResponse,
             key: tuple[str, str, int]) -> None:
        """Keep the rest of ``r``'s body (the bytes of ``url`` from ``offset``) for
        :meth:`unpark`: a run read as the first part of a longer range leaves the rest coming,
        so the next run needs no request of its own (one request per stretch of runs)."""
        self._unpark()
        self._local.parked = (url, offset, r, key)

    def unpark(self, url: str, offset: int, need: int,
               ) -> tuple[http.client.HTTPResponse, tuple[str, str, int]] | None:
        """The parked response whose body goes on with the ``need`` bytes of ``url`` from
        ``offset``, taken (the caller reads it); None if there is none. Any other parked body is dropped
        with its connection (its bytes are not wanted: reading them costs more than a new
        connection)."""
        p = getattr(self._local, "parked", None)
        if p is not None and p[0] == url and p[1] == offset and (p[2].length or 0) >= need:
            self._local.parked = None
            return p[2], p[3]
        self._unpark()
        return None

    def _unpark(self) -> None:
        p = getattr(self._local, "parked", None)
        if p is not None:
            self._local.parked = None
            self.drop(p[3])

    def drop(self, key: tuple[str, str, int]) -> None:
        """Close and forget this thread's connection ``key`` (after a failure, or a response
        left unread)."""
        conn = self._pool().pop(key, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's connections."""
        self._local.parked = None
        self._drop_ahead()
        pool = self._pool()
        for conn in [*pool.values(), *self._spares().values()]:
            conn.close()
        pool.clear()
        self._spares().clear()

    def __del__(self) -> None:
        for conn in list(self._all):
            conn.close()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class _HTTP(http.client.HTTPConnection):
    """An ``HTTPConnection`` with Nagle's algorithm off, as urllib3 sets it (a small request is
    never held back behind an unacknowledged segment), and a receive buffer of ``RCVBUF``."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)


class _HTTPS(http.client.HTTPSConnection):
    """``HTTPSConnection`` with Nagle's algorithm off and a large receive buffer (see
    :class:`_HTTP`)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)

