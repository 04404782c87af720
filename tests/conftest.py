"""Shared test servers: nginx over HTTP, moto's S3 server, and a TCP fault proxy.

All of them listen on 127.0.0.1 on free ports, are session-scoped (started once), and are bounded
in time: start-up waits at most :data:`START_TIMEOUT_S`, every socket has a timeout, and stopping
closes everything the fixture opened.

- ``nginx`` (:class:`Nginx`): serves ``nginx.root`` (a session temporary folder) at ``nginx.url``.
  Copy or write a shard folder under ``nginx.root / NAME`` and read it at ``nginx.url + "/NAME"``.
  nginx runs as a foreground process (``daemon off; master_process off``) with a generated config,
  logs and temp folders in temporary folders. Skipped when nginx is not installed.
- ``s3`` (``servers_s3.S3``): moto's standalone server, a subprocess, at ``s3.endpoint``;
  ``s3.client()`` is a boto3 client with test credentials, ``s3.upload(folder, bucket, prefix)``
  copies a folder, ``s3.config(**kw)`` is a :class:`blocklm.pipeline.RemoteConfig` pointing at it.
- ``fault_proxy`` (:class:`FaultProxy`): a factory; ``fault_proxy(upstream_port)`` starts a proxy to
  ``127.0.0.1:upstream_port`` (closed at the end of the test). Queue faults with
  ``proxy.add(kind, after=..., seconds=..., status=...)``: each new connection takes the next one
  (``"cut"`` closes the connection after ``after`` bytes of response, ``"stall"`` sends ``after``
  bytes then goes silent for ``seconds``, ``"error"`` answers HTTP ``status`` without contacting
  the server); once the queue is empty, connections pass through. ``proxy.connections`` and
  ``proxy.faults_done`` count what happened; ``proxy.requests`` keeps the first bytes of what
  clients sent (to check ``Range`` headers).
- ``small_shards`` / ``small_keys``: a small session-scoped dataset folder written with
  ``ShardWriter`` (302 samples in 7 shards, text and bytes blocks plus one real WAV and one real
  PNG from the corpora) and its keys in written order. Read-only: copy it before corrupting it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 15.0
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = START_TIMEOUT_S, proc=None) -> None:
    """Block until something accepts connections on ``port`` (or fail after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout} s")


# ----------------------------------------------------------------------------- nginx

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    types {{ application/x-tar tar; application/json json; }}
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {root};
        location / {{ autoindex on; }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                     else None)


class Nginx:
    """An nginx process serving ``root`` at ``url`` (see the module docstring)."""

    def __init__(self, root: Path, tmp: Path) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        self.root = root
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, host=HOST, port=self.port, root=root))
        self.log = tmp / "error.log"
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port, proc=self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"nginx did not start: {self.proc.stderr.read().decode()[:2000]}"
                               ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def nginx(tmp_path_factory):
    """nginx on 127.0.0.1 serving ``nginx.root`` (session-scoped)."""
    if nginx_binary() is None:
        pytest.skip("nginx not installed")
    server = Nginx(tmp_path_factory.mktemp("www"), tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


# ----------------------------------------------------------------------------- S3 (moto)

def _helper(name: str):
    """The helper module ``tests/NAME.py``, loaded by path (tests/ is not a package, and
    ``--import-mode=importlib`` puts nothing on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"blocklm_tests_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on 127.0.0.1 (session-scoped)."""
    pytest.importorskip("moto.server")
    server = _helper("servers_s3").S3()
    yield server
    server.stop()


# ----------------------------------------------------------------------------- fault proxy

@dataclass
class Fault:
    kind: str  # "cut" | "stall" | "error"
    after: int = 0  # response bytes passed before the fault (cut, stall)
    seconds: float = 0.0  # how long a stall lasts
    status: int = 503  # HTTP status of an "error"


class FaultProxy:
    """A TCP proxy to ``127.0.0.1:upstream`` that injects queued faults (module docstring)."""

    IO_TIMEOUT_S = 30.0
    MAX_STALL_S = 30.0

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.faults: deque[Fault] = deque()
        self.connections = 0
        self.faults_done = 0
        self.requests: list[bytes] = []  # the first bytes of every chunk clients sent (bounded)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def add(self, kind: str, *, after: int = 0, seconds: float = 0.0, status: int = 503,
            times: int = 1) -> None:
        """Queue ``times`` faults of ``kind`` for the next new connections."""
        if kind not in ("cut", "stall", "error"):
            raise ValueError(kind)
        with self._lock:
            for _ in range(times):
                self.faults.append(Fault(kind, after, min(seconds, self.MAX_STALL_S), status))

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
                fault = self.faults.popleft() if self.faults else None
                self._socks.append(client)
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: Fault | None) -> None:
        client.settimeout(self.IO_TIMEOUT_S)
        if fault is not None and fault.kind == "error":
            self._answer_error(client, fault)
            return
        try:
            up = socket.create_connection((HOST, self.upstream), timeout=self.IO_TIMEOUT_S)
        except OSError:
            client.close()
            return
        with self._lock:
            self._socks.append(up)
        threading.Thread(target=self._pump, args=(client, up, None, True), daemon=True).start()
        self._pump(up, client, fault)

    def _answer_error(self, client: socket.socket, fault: Fault) -> None:
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = client.recv(4096)
                if not chunk:
                    break
                data += chunk
            client.sendall(f"HTTP/1.1 {fault.status} Injected Fault\r\nContent-Length: 0\r\n"
                           "Connection: close\r\n\r\n".encode())
            with self._lock:
                self.faults_done += 1
        except OSError:
            pass
        finally:
            client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, fault: Fault | None,
              record: bool = False) -> None:
        passed = 0
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self._lock:
                        if len(self.requests) < 10000:
                            self.requests.append(data[:2048])
                if fault is not None and passed + len(data) > fault.after:
                    dst.sendall(data[:fault.after - passed])
                    with self._lock:
                        self.faults_done += 1
                    if fault.kind == "stall":
                        self._stop.wait(fault.seconds)
                    break
                dst.sendall(data)
                passed += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def fault_proxy():
    """Factory: ``fault_proxy(upstream_port) -> FaultProxy``; all closed after the test."""
    made: list[FaultProxy] = []

    def make(upstream: int) -> FaultProxy:
        p = FaultProxy(upstream)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# ----------------------------------------------------------------------------- test shards

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
SMALL_SAMPLES = 300
SMALL_SHARD_SAMPLES = 45


def small_sample(i: int):
    """Sample ``i`` of the ``small_shards`` dataset (key ``s{i:05d}``), rebuilt on demand."""
    from blocklm.formats import Sample, bytes_block, text_block

    blocks = [text_block(f"sample {i} " + "lorem ipsum " * (i % 7))]
    if i % 3 == 0:
        blocks.append(bytes_block("raw", (i % 5 + 1,), bytes(range(i % 5 + 1))))
    return Sample(f"s{i:05d}", blocks)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A dataset folder: samples ``s00000``..``s00299`` (text, some with a bytes block) in shards
    of at most 45, then, when the corpora are present, ``wav0`` (a real FSDD WAV) and ``png0`` (the
    smallest Set14 PNG). Read-only: copy it before corrupting anything."""
    from blocklm.formats import Sample, ShardWriter, audio_file_block, image_file_block

    out = tmp_path_factory.mktemp("small") / "ds"
    with ShardWriter(out, max_samples=SMALL_SHARD_SAMPLES) as w:
        for i in range(SMALL_SAMPLES):
            w.write(small_sample(i))
        wav = CORPORA / "audio" / "fsdd" / "0_jackson_0.wav"
        png = CORPORA / "images" / "set14"
        pngs = sorted(png.glob("*.png")) if png.is_dir() else []
        if wav.is_file():
            w.write(Sample("wav0", [audio_file_block(wav.read_bytes())]))
        if pngs:
            w.write(Sample("png0", [image_file_block(min(pngs, key=lambda p: p.stat().st_size)
                                                     .read_bytes())]))
    return out


@pytest.fixture(scope="session")
def small_keys(small_shards) -> list[str]:
    """The keys of ``small_shards`` in written order."""
    from blocklm.formats import iter_index

    return [e.key for _, e in iter_index(small_shards)]


@pytest.fixture(scope="session")
def corpora() -> Path:
    """The sample corpora (read in place); tests that need them skip where they are absent."""
    if not CORPORA.is_dir():
        pytest.skip(f"sample corpora not found at {CORPORA}")
    return CORPORA
