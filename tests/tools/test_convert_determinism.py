"""Byte-identical shards whatever the worker count; kill -9 and --resume equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import run_convert


def shard_bytes(out: Path) -> dict[str, bytes]:
    """Every shard, index and the manifest of a dataset folder."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith((".tar", ".index.json")) or p.name == "manifest.json"}


def test_same_bytes_for_any_worker_count(image_dir, audio_dir, small_text, tmp_path):
    inputs = [str(image_dir), str(audio_dir), str(small_text)]
    outs = []
    for j in (1, 2, 3):
        out = tmp_path / f"j{j}"
        run_convert(inputs, out, ConvertOptions(workers=j, shard_samples=4, quiet=True))
        outs.append(shard_bytes(out))
    assert len([n for n in outs[0] if n.endswith(".tar")]) > 3
    assert outs[0] == outs[1] == outs[2]


def test_rerun_into_same_folder_replaces_old_shards(audio_dir, tmp_path):
    out = tmp_path / "o"
    run_convert([str(audio_dir)], out, ConvertOptions(workers=1, shard_samples=1, quiet=True))
    run_convert([str(audio_dir)], out, ConvertOptions(workers=1, shard_samples=5, quiet=True))
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar"]


def test_resume_of_a_finished_job_does_nothing(audio_dir, tmp_path):
    opts = ConvertOptions(workers=1, shard_samples=2, quiet=True)
    run_convert([str(audio_dir)], tmp_path / "o", opts)
    before = shard_bytes(tmp_path / "o")
    opts.resume = True
    rep = run_convert([str(audio_dir)], tmp_path / "o", opts)
    assert rep.complete and rep.samples == 5 and shard_bytes(tmp_path / "o") == before


def _next_item(out: Path) -> int:
    try:
        return json.loads((out / "progress.json").read_text())["next_item"]
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("durable", ["--durable", "--no-durable"])
def test_kill_and_resume_gives_the_same_shards(corpora, tmp_path, durable):
    """Killed twice with every process of the job at once, then resumed: the same shards as an
    uninterrupted run. Without fsync too (--no-durable): the page cache outlives the processes."""
    src = tmp_path / "fsdd"
    src.mkdir()
    for name in sorted(os.listdir(corpora / "audio/fsdd"))[:600]:
        os.symlink(corpora / "audio/fsdd" / name, src / name)
    (src / "zz_bad.wav").write_bytes(b"RIFF....")  # a rejection before the kill point too
    (src / "00_bad.wav").write_bytes(b"")
    args = [str(src), "--shard-samples", "40", "-j", "2", "-q", durable]
    ref = tmp_path / "ref"
    run_convert([str(src)], ref, ConvertOptions(workers=2, shard_samples=40, quiet=True))

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "blocklm.tools.cli", "convert", *args, "--out", str(out)]
    done = 0
    for attempt in range(2):  # killed twice: once in the first run, once while resuming
        proc = subprocess.Popen(cmd + ["--resume"] * attempt, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while _next_item(out) <= done and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, mid-run
        proc.wait()
        assert not (out / "report.json").exists(), "the job finished before it was killed"
        done = _next_item(out)
        for p in out.glob("*.tar"):  # no partial shard under a final name
            assert (out / (p.name[:-4] + ".index.json")).exists()

    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert res.returncode == 3, res.stderr  # the two bad files are still accounted for
    assert shard_bytes(out) == shard_bytes(ref)
    rep, want = (json.loads((d / "report.json").read_text()) for d in (out, ref))
    assert rep["resumed_at"] > 0 and rep["rejected"] == want["rejected"]
    assert (rep["inputs"], rep["samples"]) == (want["inputs"], want["samples"]) == (602, 600)
    assert not list(out.glob("*.tmp")) and not (out / "progress.json").exists()


def test_resume_refuses_other_options_or_missing_shards(audio_dir, tmp_path, run_cli):
    out = tmp_path / "o"
    opts = ConvertOptions(workers=1, shard_samples=2, quiet=True)
    run_convert([str(audio_dir)], out, opts)
    res = run_cli("convert", audio_dir, "--out", out, "--shard-samples", "3", "--resume", "-q")
    assert res.exit_code == 2 and "other inputs or options" in res.stderr
    # --deep-check may reject more inputs: a job keeps it (and, off, its fingerprint from before
    # the option existed, so older journals and make_shards stamps stay valid)
    assert "deep_check" not in opts.fingerprint_fields()
    res = run_cli("convert", audio_dir, "--out", out, "--shard-samples", "2", "--resume", "-q",
                  "--deep-check")
    assert res.exit_code == 2 and "other inputs or options" in res.stderr
    # an interrupted job whose journal names a shard that is gone
    journal = {"fingerprint": json.loads((out / "report.json").read_text())["fingerprint"],
               "next_item": 2, "samples": 2, "rejected": [],
               "shard_infos": [json.loads((out / "manifest.json").read_text())["shards"][0]]}
    (out / "report.json").unlink()
    (out / "progress.json").write_text(json.dumps(journal))
    (out / "shard-000000.tar").unlink()
    res = run_cli("convert", audio_dir, "--out", out, "--shard-samples", "2", "--resume", "-q")
    assert res.exit_code == 2 and "is missing" in res.stderr


def test_resume_refuses_inputs_that_changed(corpora, tmp_path, run_cli):
    src = tmp_path / "fsdd"
    src.mkdir()
    for name in sorted(os.listdir(corpora / "audio/fsdd"))[:6]:
        os.symlink(corpora / "audio/fsdd" / name, src / name)
    out = tmp_path / "o"
    run_convert([str(src)], out, ConvertOptions(workers=1, shard_samples=2, quiet=True))
    # turn the finished job into one interrupted after its second shard
    fp = json.loads((out / "report.json").read_text())["fingerprint"]
    shards = json.loads((out / "manifest.json").read_text())["shards"][:2]
    run_convert([str(src)], tmp_path / "ref", ConvertOptions(workers=1, shard_samples=2,
                                                             quiet=True))
    import xxhash

    h = xxhash.xxh3_64()
    for name in sorted(os.listdir(src))[:4]:
        h.update(f"{src / name}\n".encode())
    journal = {"fingerprint": fp, "next_item": 4, "done_hash": h.hexdigest(), "samples": 4,
               "rejected": [], "shard_infos": shards}
    (out / "report.json").unlink()
    (out / "progress.json").write_text(json.dumps(journal))
    args = ["convert", src, "--out", out, "--shard-samples", "2", "-j", "1", "-q", "--resume"]
    os.symlink(corpora / "audio/fsdd/9_theo_9.wav", src / "0_aaa.wav")  # a new first file
    res = run_cli(*args)
    assert res.exit_code == 2 and "changed since the interrupted run" in res.stderr
    (src / "0_aaa.wav").unlink()
    (out / "progress.json").write_text(json.dumps(journal))
    assert run_cli(*args).exit_code == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")


def test_output_inside_the_input_is_never_read(audio_dir, tmp_path):
    out = audio_dir / "shards"
    for _ in range(2):
        rep = run_convert([str(audio_dir)], out, ConvertOptions(workers=1, quiet=True))
        assert rep.samples == 5 and rep.rejected == [] and str(out) in rep.skipped
