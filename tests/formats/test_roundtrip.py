"""Property test: any valid sample written and read back (every way) is identical."""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocklm.formats import Block, Sample, ShardReader, ShardWriter, iter_dataset, scan_shard
from blocklm.formats.codecs import CODECS

segment = st.text("abcXYZ019_-", min_size=1, max_size=10)
keys = st.lists(segment, min_size=1, max_size=3).map("/".join).filter(lambda k: len(k) <= 64)
modes = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
codecs = st.one_of(st.sampled_from(sorted(CODECS)), st.from_regex(r"[a-z][a-z0-9_]{0,31}",
                                                                  fullmatch=True))
meta_values = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
metas = st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), meta_values,
                        max_size=4)
payloads = st.one_of(st.binary(max_size=300), st.just(b"a" * 2000), st.just(b""))
blocks = st.builds(Block, mode=modes, shape=st.lists(st.integers(0, 1000), max_size=3).map(tuple),
                   codec=codecs, payload=payloads, meta=metas)


@st.composite
def sample_lists(draw):
    ks = draw(st.lists(keys, min_size=1, max_size=6, unique=True))
    return [Sample(k, draw(st.lists(blocks, max_size=4))) for k in ks]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(samples=sample_lists(), max_samples=st.integers(1, 4))
def test_write_read_identical(samples, max_samples):
    with tempfile.TemporaryDirectory() as d:
        with ShardWriter(d, max_samples=max_samples) as w:
            for s in samples:
                w.write(s)
        assert list(iter_dataset(d)) == samples
        # by index, one sample at a time, and by scanning the tar without the index
        first = ShardReader(f"{d}/shard-000000.tar")
        assert [first[i] for i in range(len(first))] == samples[:len(first)]
        with open(f"{d}/shard-000000.tar", "rb") as f:
            assert [s for _, s in scan_shard(f, shard="x")] == samples[:len(first)]
