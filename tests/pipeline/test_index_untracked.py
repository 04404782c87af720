"""The compiled index's per-sample rows (the fast path's records, the bulk form's rows) hold no
container the garbage collector must track (metadata by its position in a shared list, payload
ranges as ints, not slices), so the collector untracks them and a full collection while training
does not traverse them (some 44k objects of the small text set); blocks still get their index's
own metadata dicts, block by block."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from blocklm.formats import Sample, ShardReader, ShardWriter, bytes_block, text_block
from blocklm.formats.reader import BlockDecoder
from blocklm.pipeline.fastpath import CompiledShard, FastDecoder

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


@pytest.fixture(scope="module", params=["single", "multi"])
def shard(request, tmp_path_factory):
    """Samples whose blocks carry several distinct metadata (long texts stored as zstd)."""
    out = tmp_path_factory.mktemp("untracked") / "ds"
    with ShardWriter(out, max_samples=1000) as w:
        for i in range(120):
            blocks = [text_block(f"sample {i} " + "to be " * (i % 50),
                                 meta={"lang": ["en", "fr", "de"][i % 3]} if i % 4 else None)]
            if request.param == "multi":
                blocks += [bytes_block("raw", (k + 1,), bytes(range(k + 1)),
                                       meta={"part": k, "of": i % 5}) for k in range(i % 3)]
            w.write(Sample(f"s{i:04d}", blocks))
    return str(out / "shard-000000.tar")


def test_index_rows_are_untracked_and_blocks_get_their_index_metadata(shard):
    r = ShardReader(shard)
    comp = CompiledShard(r.index.samples)
    assert FastDecoder(comp, BlockDecoder(shard)).bulk() is None  # the first pass
    dec = FastDecoder(comp, BlockDecoder(shard))
    bulk = dec.bulk()
    for _ in range(8):  # a collection untracks the tuples whose items it has found untracked
        gc.collect()    # (in the order it meets them: nested ones may take a few)
    assert not any(gc.is_tracked(rec) for rec in comp.recs)
    assert not any(gc.is_tracked(row) for row in bulk.rows)
    assert not any(type(x) is slice for x in gc.get_referents(*gc.get_referents(bulk)))
    data = open(shard, "rb").read()
    n = len(r)
    cut = bulk.cut(0, n, data, np.frombuffer(data, dtype=np.uint8), 0)
    fast = [dec.sample(i, data, memoryview(data), 0) for i in range(n)]
    assert cut == fast == [r[i] for i in range(n)]
    for got in (cut, fast):
        for s, e in zip(got, r.index.samples):
            assert [b.meta for b in s.blocks] == [b.meta for b in e.blocks]
            assert all(b.meta is i.meta for b, i in zip(s.blocks, e.blocks))
