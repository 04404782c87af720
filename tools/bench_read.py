"""``blocktool bench read``: loader throughput against its ceiling and webdataset, in one run.

Four measurements over the same shards: a plain sequential read of the shard bytes (the ceiling),
``webdataset.WebDataset``, ``BlockDataset`` without decoding and ``BlockDataset`` decoding every
block; plus peak RSS and, with ``--rss-epochs``, RSS growth over many epochs (settled RSS after each
epoch; growth from the median of epochs 2-4 to the median of the last three). Each figure is the
best of ``--repeat`` passes (the first pass also warms the page cache and the loader's index
cache); the loader's first pass, with its index parsing, is reported as ``blocklm_cold``.
``--nginx`` serves the local dataset folders with a temporary nginx on 127.0.0.1 and measures
through HTTP instead; it also reads the same folders from the local disk in the same run
(``blocklm_local``, its passes interleaved with the HTTP ones so both see the same machine load)
and reports ``nginx_vs_local``, the ratio the loader's target is stated in.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import resource
import shutil
import socket
import statistics
import string
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import click

RUN = 8 << 20
# nginx's defaults but for the logs: one worker (the machine has 2 cores, the reader needs one),
# sendfile on, tcp_nopush off (with it on, some kept-alive range answers stall 40 ms waiting for
# a delayed ACK: measured here on 75 KB and 1 MB ranges), keep-alive without a request cap
NGINX_CONF = string.Template(
    "daemon off; master_process off; worker_processes 1; pid $t/nginx.pid;\n"
    "error_log $t/error.log warn; events { worker_connections 256; }\n"
    "http { access_log off; sendfile on; tcp_nopush off; keepalive_requests 100000;\n"
    "client_body_temp_path $t/b; proxy_temp_path $t/p; fastcgi_temp_path $t/f;\n"
    "uwsgi_temp_path $t/u; scgi_temp_path $t/s; default_type application/octet-stream;\n"
    "server { listen 127.0.0.1:$p; root $w; } }\n")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _settled_rss_mb() -> float:
    """RSS after a garbage collection and, on glibc, returning freed heap pages to the system:
    live memory, not what the allocator happens to keep (which swings by a few % per epoch)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_mb()


def _rss_split_mb() -> dict:
    """Resident memory now, split as the kernel counts it: private (anonymous) pages, and file
    pages (memory-mapped shards: the page cache, shared and reclaimable)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0][3:].lower() + "_mb"] = round(int(line.split()[1]) / 1024, 1)
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pass(fn: Callable[[], tuple[int, int]]) -> dict:
    t = time.perf_counter()
    n, b = fn()
    dt = max(time.perf_counter() - t, 1e-9)
    return {"samples_per_s": round(n / dt, 1), "MBps": round(b / dt / 1e6, 1),
            "seconds": round(dt, 4), "samples": n, "bytes": b}


def _best(fn: Callable[[], tuple[int, int]], repeat: int) -> tuple[dict, dict]:
    """Run ``fn`` (-> samples, bytes) ``repeat`` times: (best pass, first pass) as figures."""
    runs = [_pass(fn) for _ in range(repeat)]
    return max(runs, key=lambda r: r["samples_per_s"]), runs[0]


def _best_interleaved(fa: Callable[[], tuple[int, int]], fb: Callable[[], tuple[int, int]],
                      repeat: int) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """:func:`_best` of two readers whose passes alternate (a, b, a, b, ...), so a burst of
    load from elsewhere falls on both rather than on one reader's whole series."""
    a, b = [], []
    for _ in range(repeat):
        a.append(_pass(fa))
        b.append(_pass(fb))
    best = lambda runs: max(runs, key=lambda r: r["samples_per_s"])  # noqa: E731
    return (best(a), a[0]), (best(b), b[0])


@contextlib.contextmanager
def serve_nginx(roots: list[Path]) -> Iterator[dict[Path, str]]:
    """A temporary nginx on 127.0.0.1 serving each folder of ``roots``: folder -> URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise click.ClickException("nginx is not installed (apt-get install nginx)")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        www = Path(tmp) / "www"
        www.mkdir()
        urls = {}
        for i, r in enumerate(roots):
            (www / f"d{i}").symlink_to(r.resolve(), target_is_directory=True)
            urls[r] = f"http://127.0.0.1:{port}/d{i}"
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.substitute(t=tmp, p=port, w=www))
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", tmp], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise click.ClickException("nginx did not start") from None
                    time.sleep(0.05)
            yield urls
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def http_ceiling(urls: list[str], sizes: list[int], range_bytes: int) -> tuple[int, int]:
    """One pass of the bare loopback HTTP ceiling over ``urls`` (of ``sizes`` bytes): range
    requests of ``range_bytes`` on one kept-alive socket, each body received with one
    ``recv(MSG_WAITALL)`` into one reused buffer; nothing parsed but the header's end, nothing
    checked, no Python per byte. -> (0, bytes received)."""
    host, port = urlsplit(urls[0]).hostname, urlsplit(urls[0]).port or 80
    buf = bytearray(range_bytes + 65536)
    mv = memoryview(buf)
    total = 0
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        for url, size in zip(urls, sizes):
            path = urlsplit(url).path
            for off in range(0, size, range_bytes):
                n = min(range_bytes, size - off)
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                          f"Range: bytes={off}-{off + n - 1}\r\n\r\n".encode())
                got = 0
                while (end := buf.find(b"\r\n\r\n", 0, got)) < 0:
                    k = s.recv_into(mv[got:], 65536)
                    if k == 0:
                        raise click.ClickException(f"{url}: connection closed")
                    got += k
                have = got - end - 4
                mv[:have] = mv[end + 4:got]
                while have < n:
                    k = s.recv_into(mv[have:n], n - have, socket.MSG_WAITALL)
                    if k == 0:
                        raise click.ClickException(f"{url}: connection closed")
                    have += k
                total += n
    return 0, total


def run_bench(sources: list[str], *, repeat: int = 3, rss_epochs: int = 0,
              decode: bool = True, map_cache_mb: int | None = None,
              local_sources: list[str] | None = None, ceiling: bool = False) -> dict:
    """The figures of one benchmark run over ``sources`` (folders, manifests or URLs).
    ``map_cache_mb`` bounds the local shards BlockDataset keeps mapped across passes (None: its
    default; 0: every pass maps its shards afresh, as on a dataset larger than the cache).
    ``local_sources``: the same dataset on the local disk (``sources`` being served from it):
    read in the same run, passes interleaved with ``sources``', as ``blocklm_local``.
    ``ceiling``: also the bare HTTP ceiling (:func:`http_ceiling`, 2 and 8 MiB ranges) over the
    same shards, when they are HTTP URLs."""
    import webdataset as wds

    from blocklm.formats import DEFAULT_LIMITS
    from blocklm.pipeline import BlockDataset, RemoteOpener
    from blocklm.pipeline.urls import count_samples, list_shards

    opener = RemoteOpener()
    shards = list_shards(sources, opener)
    counts = count_samples(shards, opener, DEFAULT_LIMITS)
    urls = [s.url for s in shards]
    total_samples = sum(counts)
    out: dict = {"sources": sources, "shards": len(urls), "samples": total_samples}

    def raw() -> tuple[int, int]:
        b = 0
        for u in urls:
            src = opener(u)
            size = src.size()
            for off in range(0, size, RUN):
                b += len(src.read(off, min(RUN, size - off)))
        return total_samples, b

    def webdataset() -> tuple[int, int]:
        n = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
                n += 1
        return n, out["bytes"]

    maps = {} if map_cache_mb is None else {"map_cache_bytes": map_cache_mb << 20}
    ds = BlockDataset(sources, shuffle=False, opener=opener, **maps)  # verify=True (checksums)
    out["verify"] = ds.config.verify
    out["map_cache_bytes"] = ds._maps.max_bytes

    def blocklm() -> tuple[int, int]:
        before = ds.stats.bytes
        n = 0
        for _ in ds:
            n += 1
        return n, ds.stats.bytes - before

    def blocklm_decode() -> tuple[int, int]:
        before = ds.stats.bytes
        n = 0
        for s in ds:
            for b in s.blocks:
                b.decode()
            n += 1
        return n, ds.stats.bytes - before

    out["raw"], _ = _best(raw, repeat)
    out["bytes"] = out["raw"]["bytes"]
    if ceiling and all(u.startswith("http://") for u in urls):
        sizes = [opener(u).size() for u in urls]
        out["http_ceiling"] = {f"{mib}MiB": _best(
            lambda mib=mib: http_ceiling(urls, sizes, mib << 20), repeat)[0]["MBps"]
            for mib in (2, 8)}
    out["webdataset"], _ = _best(webdataset, repeat)
    if local_sources is None:
        out["blocklm"], out["blocklm_cold"] = _best(blocklm, repeat)
    else:
        local = BlockDataset(local_sources, shuffle=False, **maps)

        def blocklm_local() -> tuple[int, int]:
            before = local.stats.bytes
            n = sum(1 for _ in local)
            return n, local.stats.bytes - before

        (out["blocklm_local"], _), (out["blocklm"], out["blocklm_cold"]) = _best_interleaved(
            blocklm_local, blocklm, repeat)
        out["nginx_vs_local"] = round(out["blocklm"]["MBps"]
                                      / max(out["blocklm_local"]["MBps"], 1e-9), 3)
    if decode:
        out["blocklm_decode"], _ = _best(blocklm_decode, max(1, repeat - 1))
    out["speedup_vs_webdataset"] = round(out["blocklm"]["samples_per_s"]
                                         / max(out["webdataset"]["samples_per_s"], 1e-9), 2)
    if rss_epochs >= 6:
        shuffled = BlockDataset(sources, seed=0, opener=opener, **maps)
        at: list[float] = []
        for epoch in range(1, rss_epochs + 1):
            shuffled.set_epoch(epoch)
            for _ in shuffled:
                pass
            at.append(_settled_rss_mb())
        early, late = statistics.median(at[1:4]), statistics.median(at[-3:])
        out["rss_epochs"] = {"epochs": rss_epochs, "epoch2_mb": round(at[1], 1),
                             "last_mb": round(at[-1], 1), "min_mb": round(min(at[1:]), 1),
                             "max_mb": round(max(at[1:]), 1),
                             "growth_pct": round(100 * (late - early) / early, 2)}
    out["rss_mb"] = round(_peak_rss_mb(), 1)
    out["rss_now"] = _rss_split_mb()
    return out


KINDS = ("raw", "webdataset", "blocklm_cold", "blocklm", "blocklm_local", "blocklm_decode")


def format_table(res: dict) -> str:
    lines = [f"sources: {' '.join(res['sources'])} ({res['shards']} shards, "
             f"{res['samples']} samples, {res['bytes'] / 1e6:.1f} MB)",
             f"{'reader':<16}{'samples/s':>12}{'MB/s':>10}"]
    for k in KINDS:
        if k in res:
            lines.append(f"{k:<16}{res[k]['samples_per_s']:>12,.0f}{res[k]['MBps']:>10,.1f}")
    lines.append(f"blocklm / webdataset: {res['speedup_vs_webdataset']}x samples/s "
                 f"(blocklm verifies every payload checksum: verify={res.get('verify')})")
    if "http_ceiling" in res:
        lines.append("bare HTTP ceiling (recv(MSG_WAITALL) into one buffer), MB/s: " + ", ".join(
            f"{k} ranges {v:,.0f}" for k, v in res["http_ceiling"].items()))
    if "nginx_vs_local" in res:
        lines.append(f"through nginx / local (blocklm, same run, passes interleaved): "
                     f"{res['nginx_vs_local']:.0%}")
    now = res.get("rss_now", {})
    lines.append(f"peak RSS: {res['rss_mb']} MB (at the end: {now.get('anon_mb')} MB private, "
                 f"{now.get('file_mb')} MB mapped file pages)")
    if "rss_epochs" in res:
        r = res["rss_epochs"]
        lines.append(f"RSS epoch 2 -> {r['epochs']}: {r['epoch2_mb']} -> {r['last_mb']} MB "
                     f"(range {r['min_mb']}-{r['max_mb']}; median of epochs 2-4 -> median of the "
                     f"last 3: {r['growth_pct']:+.2f}%)")
    return "\n".join(lines)


@click.command("read")
@click.argument("sources", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--repeat", default=3, show_default=True, help="Passes per reader; best counts.")
@click.option("--rss-epochs", default=0, show_default=True,
              help="Also read this many (>= 6) shuffled epochs and report RSS growth from "
                   "epochs 2-4 to the last 3 (medians, after gc and malloc_trim).")
@click.option("--nginx", "via_nginx", is_flag=True,
              help="Serve the local dataset folders with a temporary nginx and read over HTTP; "
                   "the local read runs in the same run too (blocklm_local, nginx_vs_local).")
@click.option("--no-decode", is_flag=True, help="Skip the decoding measurement.")
@click.option("--ceiling", is_flag=True,
              help="With --nginx: also the bare HTTP ceiling (range requests received into one "
                   "reused buffer, nothing else done; 2 and 8 MiB ranges).")
@click.option("--map-cache-mb", type=int, default=None,
              help="MiB of local shards BlockDataset keeps mapped across passes (default: its "
                   "own; 0: map afresh every pass, as for a dataset larger than the cache).")
def bench_read(sources: tuple[str, ...], as_json: bool, repeat: int, rss_epochs: int,
               via_nginx: bool, no_decode: bool, map_cache_mb: int | None,
               ceiling: bool) -> None:
    """Read throughput: raw bytes, webdataset, BlockDataset, BlockDataset + decode.

    SOURCES are dataset folders, manifests, shard patterns or URLs (read together).

    \b
    Examples:
      blocktool bench read data/shards/mixed
      blocktool bench read data/shards/text --nginx --json
      blocktool bench read data/shards/mixed --rss-epochs 20
      blocktool bench read data/shards/images --map-cache-mb 0
      blocktool bench read data/shards/images --nginx --ceiling --no-decode --repeat 15
    """
    if repeat < 1:
        raise click.BadParameter("--repeat must be >= 1")
    if 0 < rss_epochs < 6:
        raise click.BadParameter("--rss-epochs needs at least 6 epochs (or 0 for none)")
    with contextlib.ExitStack() as stack:
        srcs, local = list(sources), None
        if via_nginx:
            roots = [Path(s) for s in srcs]
            if not all(r.is_dir() for r in roots):
                raise click.BadParameter("--nginx serves local dataset folders")
            urls = stack.enter_context(serve_nginx(roots))
            srcs, local = [urls[r] for r in roots], list(sources)
        res = run_bench(srcs, repeat=repeat, rss_epochs=rss_epochs, decode=not no_decode,
                        map_cache_mb=map_cache_mb, local_sources=local, ceiling=ceiling)
    res["via"] = "nginx" if via_nginx else "local"
    click.echo(json.dumps(res, indent=1) if as_json else format_table(res))
