"""``--durable`` (default) puts every file on disk before its rename; ``--no-durable`` leaves
that to the page cache and writes the same bytes (kill -9 and --resume: test_convert_determinism)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocklm.formats import writer
from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import run_convert


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith((".tar", ".index.json")) or p.name == "manifest.json"}


@pytest.mark.parametrize("workers", [1, 2])
def test_no_durable_syncs_nothing_and_writes_the_same_bytes(image_dir, audio_dir, tmp_path,
                                                             monkeypatch, workers):
    calls: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync",
                        lambda fd: (calls.append("fdatasync"), real_fdatasync(fd))[1])
    monkeypatch.setattr(writer, "SYNC_AHEAD", 1 << 10)  # a sync-ahead after every sample
    inputs = [str(image_dir), str(audio_dir)]
    outs = {}
    for durable in (True, False):
        calls.clear()
        out = tmp_path / f"durable-{durable}"
        rep = run_convert(inputs, out, ConvertOptions(workers=workers, shard_samples=3,
                                                      quiet=True, durable=durable))
        assert rep.complete and rep.shards == 3
        outs[durable] = shard_bytes(out)
        if durable:  # each shard, index, the journal, manifest and report; sync-aheads too
            assert calls.count("fsync") >= 2 * rep.shards + 2 and "fdatasync" in calls
        else:
            assert calls == []
        assert not list(out.glob("*.tmp"))
    assert outs[True] == outs[False]


def test_durable_is_not_part_of_the_job_identity(audio_dir, tmp_path):
    """A job started durable may be resumed with --no-durable (the bytes are the same)."""
    a = ConvertOptions(workers=1, quiet=True)
    b = ConvertOptions(workers=1, quiet=True, durable=False)
    assert a.fingerprint_fields() == b.fingerprint_fields()
