"""The parent + helpers design (tools/convert_parallel.py, convert_hold.py): same bytes as one
process however the chunks are shared out and however little a helper may hold, nothing left
behind, a failing or dying helper is an error (never a hang)."""

from __future__ import annotations

import os

import pytest

from blocklm.tools import convert_hold, convert_parallel, convert_run
from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import StrictStop, run_convert


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith((".tar", ".index.json")) or p.name == "manifest.json"}


def test_claims_cover_every_item_once_and_shrink():
    """Claims from the shared counter tile the items in order, and shrink towards the end."""
    import multiprocessing as mp

    for n, w in [(9, 2), (100, 3), (2114, 2), (100_000, 8)]:
        nxt, chunks = mp.Value("q", 0), []
        while (chunk := convert_parallel.claim(nxt, n, w)) is not None:
            chunks.append(chunk)
        assert [i for a, b in chunks for i in range(a, b)] == list(range(n))
        assert all(b - a <= convert_parallel.MAX_CHUNK for a, b in chunks)
        if n > 1000:
            assert chunks[-1][1] - chunks[-1][0] < chunks[0][1] - chunks[0][0]


@pytest.mark.parametrize("smallest,largest,window,hold,ring",
                         [(8, 256, 4096, 64 << 20, 16 << 20), (1, 2, 4096, 64 << 20, 16 << 20),
                          (2, 3, 9, 0, 16 << 20), (8, 256, 4096, 64 << 20, 20_000),
                          (1, 3, 4096, 64 << 20, 9_000)])
def test_spilled_chunks_and_shard_cuts_give_the_same_bytes(image_dir, audio_dir, small_text,
                                                           tmp_path, monkeypatch, smallest,
                                                           largest, window, hold, ring):
    """Helpers' chunks (placed with span_packed, written by the helpers) cut by shard boundaries
    in the middle, with rejections among them, in one window or many, the parent's chunks held
    for their turn or (hold 0) the parent waiting for the helpers, helpers allowed to hold so
    little that they wait for write orders before they go on and images (larger than that) go
    back to the parent, equal a one-process run."""
    (audio_dir / "zz_bad.wav").write_bytes(b"RIFF....WAVE")
    inputs = [str(image_dir), str(audio_dir), str(small_text)]
    ref = tmp_path / "ref"
    rep1 = run_convert(inputs, ref, ConvertOptions(workers=1, shard_size=40_000, quiet=True))
    monkeypatch.setattr(convert_parallel, "MIN_CHUNK", smallest)
    monkeypatch.setattr(convert_parallel, "MAX_CHUNK", largest)
    monkeypatch.setattr(convert_run, "WINDOW", window)
    monkeypatch.setattr(convert_parallel, "HOLD_BYTES", hold)
    monkeypatch.setattr(convert_parallel, "MIN_HOLD", ring)
    monkeypatch.setattr(convert_parallel, "HELPERS_HOLD", ring)
    log = tmp_path / "hold.log"  # what the (forked) helpers did: "wait" and "parent" lines
    wait, note = convert_hold.HoldWriter._wait, convert_hold.HoldWriter._note

    def logged(line, real):
        def fn(self, *args):  # a wait for room (not the last one, for 0 bytes held)
            if (line == "wait" and args[0] > 0) or (line == "parent" and args[0] < args[1]
                                                     and args[2] is None):
                with open(log, "a") as f:
                    f.write(line + "\n")
            return real(self, *args)
        return fn

    monkeypatch.setattr(convert_hold.HoldWriter, "_wait", logged("wait", wait))
    monkeypatch.setattr(convert_hold.HoldWriter, "_note", logged("parent", note))
    if ring == 9_000:  # a slow parent: the helpers fill their holds before it takes anything
        import time

        real = convert_parallel.process

        def slow(item, deep_check=False):
            time.sleep(0.002)
            return real(item, deep_check)

        monkeypatch.setattr(convert_parallel, "process", slow)
    out = tmp_path / "j3"
    rep3 = run_convert(inputs, out, ConvertOptions(workers=3, shard_size=40_000, quiet=True))
    if ring == 9_000:  # the case is what it claims to be
        assert {"wait", "parent"} <= set(log.read_text().split())
    assert len([n for n in shard_bytes(ref) if n.endswith(".tar")]) > 3
    assert shard_bytes(out) == shard_bytes(ref)
    assert rep3.rejected == rep1.rejected and len(rep1.rejected) == 1
    assert not [p for p in os.listdir(out) if "spill" in p]


def _failing_chunk(self, number, items, deep_check):
    if number > 0:
        raise MemoryError("boom")
    return _real_chunk(self, number, items, deep_check)


def _dying_chunk(self, number, items, deep_check):
    os._exit(9)


_real_chunk = convert_hold.HoldWriter.convert


@pytest.mark.parametrize("chunk,match", [(_failing_chunk, "(?s)failed on the chunk at item .*MemoryError: boom"),
                                         (_dying_chunk, "died \\(exit code 9\\)")])
def test_a_failing_helper_stops_the_job_with_its_error(audio_dir, small_text, tmp_path,
                                                       monkeypatch, chunk, match):
    import time

    monkeypatch.setattr(convert_hold.HoldWriter, "convert", chunk)  # the helpers are forked
    real = convert_parallel.process

    def slow(item, deep_check=False):  # the parent's conversions (helpers: HoldWriter.convert)
        time.sleep(0.005)
        return real(item, deep_check)

    # a slow parent: otherwise it could convert every item before the helper claims one (the
    # test then saw no error, ~1 run in 12)
    monkeypatch.setattr(convert_parallel, "process", slow)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match=match):
        run_convert([str(small_text), str(audio_dir)], out,
                    ConvertOptions(workers=2, shard_samples=3, quiet=True))
    assert not [p for p in os.listdir(out) if "spill" in p]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_strict_stop_with_helpers_leaves_no_spill(audio_dir, small_text, tmp_path):
    (audio_dir / "zz_bad.wav").write_bytes(b"RIFF....WAVE")  # the last item: a helper's chunk
    out = tmp_path / "o"
    with pytest.raises(StrictStop, match="zz_bad.wav"):
        run_convert([str(small_text), str(audio_dir)], out,
                    ConvertOptions(workers=2, shard_samples=3, strict=True, quiet=True))
    assert not [p for p in os.listdir(out) if "spill" in p]
    assert (out / "report.json").is_file()


def test_a_crashed_runs_spill_folder_is_removed(audio_dir, tmp_path):
    out = tmp_path / "o"
    (out / "shard-spill-12345.tmp").mkdir(parents=True)
    (out / "shard-spill-12345.tmp" / "000003").write_bytes(b"x" * 100)
    rep = run_convert([str(audio_dir)], out, ConvertOptions(workers=1, quiet=True))
    assert rep.samples == 5 and not [p for p in os.listdir(out) if "spill" in p]


def test_an_orphaned_helper_claims_nothing(tmp_path):
    """A helper whose parent is gone (its parent pid changed) stops before its next chunk."""
    import multiprocessing as mp

    nxt = mp.Value("q", 0)
    recv, send = mp.Pipe(duplex=False)
    hold = convert_hold.Hold(1 << 16)
    convert_parallel._helper([None] * 40, 2, nxt, send, hold, False, parent=os.getppid() + 1)
    assert nxt.value == 0 and hold.written.value == 0
    with pytest.raises(EOFError):
        recv.recv()
    hold.close()


def test_a_finished_windows_counter_outlives_its_helpers(small_text, tmp_path, monkeypatch):
    """Helpers are not waited for once their window is done, and each reads its counter once
    more before it exits: that counter's shared memory must not go to the next window's
    counter (a late read would claim the next window's first chunk and convert nothing of it).
    Once its helpers are gone it is let go."""
    import ctypes
    import multiprocessing as mp

    seen = set()
    real, parent = convert_parallel.claim, os.getpid()

    def claim(nxt, n, n_workers):
        if os.getpid() == parent:
            seen.add(ctypes.addressof(nxt.get_obj()))  # the address only: nothing kept alive
        else:  # a helper (forked: the same address) may claim every chunk before the parent
            with open(tmp_path / "claims", "a") as f:
                f.write(f"{ctypes.addressof(nxt.get_obj())}\n")
        return real(nxt, n, n_workers)

    monkeypatch.setattr(convert_parallel, "claim", claim)
    monkeypatch.setattr(convert_parallel, "MIN_CHUNK", 2)
    monkeypatch.setattr(convert_parallel, "MAX_CHUNK", 3)
    rep = run_convert([str(small_text)], tmp_path / "o",
                      ConvertOptions(workers=2, text_split="lines", quiet=True))
    claims = tmp_path / "claims"  # absent when the parent claimed every chunk (a busy machine
    if claims.exists():  # can start the helpers late: failed CI once with FileNotFoundError)
        seen |= {int(a) for a in claims.read_text().split()}
    assert rep.samples >= 40 and len(seen) == 1
    fresh = mp.get_context("fork").Value("q", 0)  # what the next window would get
    assert ctypes.addressof(fresh.get_obj()) not in seen
    for _, procs in convert_parallel._RETIRED:
        for p in procs:
            p.join()
    convert_parallel._reap_retired()
    assert convert_parallel._RETIRED == []


def test_frozen_heap_leaves_the_collector_as_it_found_it():
    import gc

    assert gc.get_freeze_count() == 0
    threshold = gc.get_threshold()
    with convert_parallel.frozen_heap():
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] >= convert_parallel.GC_YOUNG
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
    gc.disable()
    try:
        with convert_parallel.frozen_heap():
            assert gc.get_freeze_count() == 0 and not gc.isenabled()
    finally:
        gc.enable()


def test_a_parent_killed_alone_resumes_to_the_same_shards(corpora, tmp_path):
    """kill -9 of the parent only: its helpers, orphaned, may still be converting while the job
    is resumed at once; they write only where their parent ordered, through the descriptors
    it passed them (never by name, so never into the resumed run's new files), so the resumed
    run gives the same shards, and they exit on their own."""
    import json
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "fsdd"
    src.mkdir()
    for name in sorted(os.listdir(corpora / "audio/fsdd"))[:600]:
        os.symlink(corpora / "audio/fsdd" / name, src / name)
    ref = tmp_path / "ref"
    run_convert([str(src)], ref, ConvertOptions(workers=2, shard_samples=40, quiet=True))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "blocklm.tools.cli", "convert", str(src), "--out", str(out),
           "--shard-samples", "40", "-j", "2", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "progress.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its helpers live on
        proc.wait()
        assert not (out / "report.json").exists(), "the job finished before it was killed"
        assert json.loads((out / "progress.json").read_text())["next_item"] > 0
        rep = run_convert([str(src)], out, ConvertOptions(workers=2, shard_samples=40,
                                                          resume=True, quiet=True))
        assert rep.complete and rep.resumed_at > 0 and rep.samples == 600
        assert shard_bytes(out) == shard_bytes(ref)
        assert not list(out.glob("*.tmp")) and not [p for p in os.listdir(out) if "spill" in p]
        deadline = time.monotonic() + 10  # the orphans: at their next claim or note
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "an orphaned helper did not exit"
            time.sleep(0.01)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_helper_reaped_elsewhere_counts_as_gone():
    """A helper whose exit status someone else collected (a program that reaps every child, or
    ignores SIGCHLD) is gone, not an error in join or is_alive."""
    child = convert_parallel.Child(lambda: None, ())
    os.waitpid(child.pid, 0)  # the status taken before the conversion looks
    assert not child.is_alive() and child.exitcode == 0
    child.join()
    failed = convert_parallel.Child(lambda: os._exit(3), ())
    failed.join()
    assert failed.exitcode == 3
    import signal
    import time

    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
    try:
        busy = convert_parallel.Child(time.sleep, (0.3,))
        assert busy.is_alive()  # no status to collect, but still running
        busy.join()
        assert not busy.is_alive() and busy.exitcode == 0
    finally:
        signal.signal(signal.SIGCHLD, old)
