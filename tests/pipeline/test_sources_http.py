"""Range reads over kept-alive ``http.client`` connections (pipeline/httpconn.py): one connection
per thread reused across reads, a connection the server closed while idle replaced without
counting a failure, redirects still followed, and every answer checked as before."""

from __future__ import annotations

import http.server
import shutil
import threading

import pytest

from blocklm.formats import iter_dataset
from blocklm.pipeline import BlockDataset, RemoteConfig, RemoteOpener, SourceError

DATA = bytes(range(256)) * 64  # 16 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves DATA at /f with ranges; /old redirects to /f; closes the connection after each
    answer without saying so when the server's ``close_silently`` is set."""

    protocol_version = "HTTP/1.1"

    def _answer(self, body: bool) -> None:
        # counted before the answer goes out: the client may check the count as soon as it has
        # the bytes, before this thread would get back to a count made after the write
        self.server.answers += 1
        if self.path == "/old":
            self.send_response(301)
            self.send_header("Location", "/f")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        rng = self.headers.get("Range")
        a, b = 0, len(DATA) - 1
        if rng:
            lo, _, hi = rng.removeprefix("bytes=").partition("-")
            a, b = int(lo), min(int(hi), len(DATA) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(DATA)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(b - a + 1))
        self.end_headers()
        if body:
            self.wfile.write(DATA[a:b + 1])
        if self.server.close_silently:
            self.close_connection = True

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._answer(True)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.answers, srv.close_silently, srv.daemon_threads = 0, False, True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv, path="/f") -> str:
    return f"http://127.0.0.1:{srv.server_port}{path}"


def test_reads_reuse_one_connection_per_thread(server, fault_proxy):
    proxy = fault_proxy(server.server_port)
    src = RemoteOpener(RemoteConfig(timeout=5))(f"{proxy.url}/f")
    assert src.size() == len(DATA)
    for a in range(0, len(DATA) - 700, 1000):
        assert src.read(a, 700) == DATA[a:a + 700]
    assert proxy.connections == 1 and src.retries == 0
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(src.read(5, 10)))
    t.start()
    t.join()
    assert got == [DATA[5:15]] and proxy.connections == 2  # another thread, its own


def test_a_connection_closed_while_idle_is_replaced_without_a_retry(server):
    server.close_silently = True
    src = RemoteOpener(RemoteConfig(timeout=5))(_url(server))
    for a in (0, 100, 5000, 9000):
        assert src.read(a, 300) == DATA[a:a + 300]
    assert src.retries == 0 and server.answers == 4


def test_redirects_are_followed(server):
    src = RemoteOpener(RemoteConfig(timeout=5))(_url(server, "/old"))
    assert src.size() == len(DATA)
    assert src.read(10, 1000) == DATA[10:1010]


def test_a_short_file_is_a_truncated_shard_not_a_retry(server):
    from blocklm.formats import TruncatedShardError

    src = RemoteOpener(RemoteConfig(timeout=5))(_url(server))
    with pytest.raises(TruncatedShardError) as e:
        src.read(len(DATA) - 10, 100)
    assert e.value.shard.endswith("/f") and src.retries == 0


def test_a_wrong_content_range_is_refused(server, monkeypatch):
    monkeypatch.setattr(_Handler, "send_header", lambda self, k, v: super(
        _Handler, self).send_header(k, "bytes 0-9/16384" if k == "Content-Range" else v))
    src = RemoteOpener(RemoteConfig(timeout=5))(_url(server))
    with pytest.raises(SourceError, match="does not start at 100"):
        src.read(100, 10)


def test_dataset_over_nginx_reads_in_runs_of_at_most_2_mib(nginx, tmp_path):
    # shards larger than one remote run: several ranges per shard, the same samples
    from blocklm.formats import Sample, ShardWriter, bytes_block

    src = tmp_path / "big"
    with ShardWriter(src, max_samples=40) as w:
        for i in range(60):
            w.write(Sample(f"k{i:03d}", [bytes_block("raw", (100_000,), bytes([i]) * 100_000)]))
    shutil.copytree(src, nginx.root / "big2mib")
    ds = BlockDataset(f"{nginx.url}/big2mib", shuffle=False, remote=RemoteConfig(timeout=5))
    assert list(ds) == list(iter_dataset(src))


def test_the_read_ahead_threads_connections_are_closed_after_each_pass(nginx, small_shards):
    import gc
    import warnings

    shutil.copytree(small_shards, nginx.root / "closing", dirs_exist_ok=True)
    ds = BlockDataset(f"{nginx.url}/closing", shuffle=False, remote=RemoteConfig(timeout=5))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(3):
            assert len(list(ds)) == len(ds)
        gc.collect()
    assert not [w for w in seen if "unclosed" in str(w.message)]
