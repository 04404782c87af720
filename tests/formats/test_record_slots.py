"""Blocks and Samples are slotted records: no per-instance ``__dict__`` (a training run keeps some
16k of each alive, and every dict was one more object for each full garbage collection to
traverse), still weak-referenceable, and the lazy blocks still pickle and compare as before."""

from __future__ import annotations

import gc
import pickle
import weakref

import zstandard

from blocklm.formats import Sample, text_block
from blocklm.formats.block import Block
from blocklm.formats.lazy import StoredBlock, ViewBlock


def _blocks() -> list[Block]:
    raw = b"to be or not to be"
    stored = zstandard.ZstdCompressor().compress(raw)
    return [text_block("to be or not to be", meta={"lang": "en"}),
            Block.trusted("text", (18,), "utf8", raw, {"lang": "en"}),
            StoredBlock.lazy("text", (18,), "utf8", {"lang": "en"}, stored, len(raw), 1 << 20,
                             ("shard-0.tar", "k", 0)),
            ViewBlock.of("text", (18,), "utf8", {"lang": "en"}, memoryview(raw))]


def test_records_have_no_instance_dict_and_stay_weak_referenceable():
    blocks = _blocks()
    s = Sample("k", blocks)
    for x in [s, *blocks, Sample.trusted("k", blocks)]:
        assert not hasattr(x, "__dict__"), type(x).__name__
        ref = weakref.ref(x)
        assert ref() is x
    assert len({id(b) for b in blocks}) == 4 and all(b == blocks[0] for b in blocks)
    gc.collect()
    assert not any(type(r) is dict for r in gc.get_referents(s))  # no dict in between
    assert all(r is b.meta for b in blocks for r in gc.get_referents(b) if type(r) is dict)


def test_lazy_blocks_pickle_as_before_into_slotted_blocks():
    _, _, stored, view = _blocks()
    got = pickle.loads(pickle.dumps(stored))
    assert not hasattr(got, "__dict__")
    assert type(got) is StoredBlock and got._payload is None and got._stored is not None
    assert got == stored and got.payload == b"to be or not to be" and got._stored is None
    assert got._where == ("shard-0.tar", "k", 0) and got.meta == {"lang": "en"}
    got = pickle.loads(pickle.dumps(view))
    assert type(got) is ViewBlock and not hasattr(got, "__dict__") and got._view is None and got.payload == view.payload
    assert bytes(got.view) == b"to be or not to be"
    assert repr(stored).startswith("StoredBlock(") and "compressed" in repr(stored)
    stored.payload = b"x"  # setting the payload drops the stored frame, as before
    assert stored.payload == b"x" and stored._stored is None
