"""A decoder library missing on the machine stops the dispatcher's run with one clear error,
instead of every block of that codec being rejected as bad data (counted, the run going on with
a whole mode gone: seen on an H200 whose soundfile lacked its cffi backend)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile as sf

from blocklm.formats import CodecUnavailableError, Sample, audio_file_block
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig

from .test_dispatch import length_cost, recording_runner, run_all, text


def _audio_samples(n: int) -> list[Sample]:
    # 24-bit: a plain 16-bit PCM WAV is read without soundfile (formats/wav.py pcm16_samples)
    buf = io.BytesIO()
    sf.write(buf, np.zeros((40, 1), dtype=np.int16), 8000, format="WAV", subtype="PCM_24")
    return [Sample(f"a{i}", [audio_file_block(buf.getvalue()), text(3)]) for i in range(n)]


@pytest.mark.parametrize("prefetch,workers", [(0, 1), (4, 1), (4, 2)])
def test_missing_decoder_stops_the_run(monkeypatch, prefetch, workers):
    samples = _audio_samples(6)
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import soundfile raises ImportError
    d = Dispatcher({m: recording_runner([]) for m in ("audio", "text")}, None,
                   DispatchConfig(prefetch=prefetch, decode_workers=workers), cost=length_cost)
    with pytest.raises(CodecUnavailableError, match="soundfile") as e:
        run_all(d, samples)
    assert "'a0'" in str(e.value) and "mode 'audio'" in str(e.value)
    assert not any(k.startswith("rejected") for k in d.counts)  # nothing counted as bad data


def test_with_the_decoder_the_same_samples_run():
    samples = _audio_samples(6)
    d = Dispatcher({m: recording_runner([]) for m in ("audio", "text")}, None,
                   DispatchConfig(prefetch=4), cost=length_cost)
    _, finished = run_all(d, samples)
    assert len(finished) == 6 and all(f.error is None for f in finished)
