"""moto's standalone S3 server for the tests, in its own process (used by ``tests/conftest.py``).

The server runs as ``python -m moto.server -H 127.0.0.1 -p PORT`` (PyPI ``moto[server]``) in a
process group of its own, not as a thread inside pytest: DataLoader tests fork the pytest
process, and a forked worker inherits a copy of every lock that any thread held at that moment;
an in-process server's request threads (werkzeug, moto, botocore) were such threads. The tests
speak to it with the real s3fs/boto3 clients over HTTP on 127.0.0.1.

Bounded: start-up waits at most :data:`START_TIMEOUT_S` for an HTTP answer (failing with the
server's stderr tail), and :meth:`S3.stop` terminates the group, then kills it after
:data:`STOP_TIMEOUT_S`.
"""

from __future__ import annotations

import atexit
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
S3_KEY, S3_SECRET = "testing", "testing"
START_TIMEOUT_S = 30.0  # importing moto and flask takes seconds on a loaded 2-core machine
STOP_TIMEOUT_S = 5.0
LOG_TAIL_BYTES = 4000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    """True when an HTTP request to the server gets any HTTP response."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class S3:
    """moto's S3 server on 127.0.0.1 in a subprocess.

    ``endpoint`` is its URL and ``port`` its port; ``client()`` is a boto3 client with test
    credentials, ``upload(folder, bucket, prefix)`` copies a folder, and ``config(**kw)`` is a
    :class:`blocklm.pipeline.RemoteConfig` pointing at it (credentials passed explicitly, never
    through environment variables).
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self._dir = tempfile.TemporaryDirectory(prefix="blocklm-moto-")
        self.log = Path(self._dir.name) / "moto.log"  # a file, not a pipe: nobody has to drain it
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        atexit.register(self.stop)  # also when pytest exits without running the fixture's end
        try:
            self._wait()
        except RuntimeError:
            self.stop()
            raise

    def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.proc.returncode} before "
                                   f"answering on {self.endpoint}; its output:\n{self.log_tail()}")
            if _answers(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within "
                           f"{START_TIMEOUT_S:.0f} s; its output:\n{self.log_tail()}")

    def log_tail(self) -> str:
        """The last :data:`LOG_TAIL_BYTES` of the server's stdout and stderr."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def client(self, endpoint: str | None = None):
        """A boto3 S3 client for ``endpoint`` (default: this server) with the test credentials."""
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Upload every file of ``folder`` to ``s3://bucket/prefix/``; returns that URL."""
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        for p in sorted(Path(folder).iterdir()):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix}/{p.name}")
        return f"s3://{bucket}/{prefix}"

    def config(self, endpoint: str | None = None, **kw):
        """A :class:`blocklm.pipeline.RemoteConfig` for this server (or ``endpoint``)."""
        from blocklm.pipeline import RemoteConfig

        return RemoteConfig(s3_endpoint_url=endpoint or self.endpoint, s3_key=S3_KEY,
                            s3_secret=S3_SECRET, **kw)

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it is still there after a bound."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._dir.cleanup()
        atexit.unregister(self.stop)
