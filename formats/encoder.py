"""SampleEncoder: a sample -> its tar members and index entry (SPEC.md, "Shards", "Storage
compression"). ``ShardWriter`` (``writer.py``) writes what it makes, in order, into shards.
"""

from __future__ import annotations

from math import prod

import zstandard
from xxhash import xxh3_64_hexdigest  # index.checksum, without a call in between

from .block import Block, Sample, check_key
from .codecs import codec_info
from .errors import FormatError
from .headers import block_head, entry_template, header_bytes, quoted
from .index import BlockInfo, IndexEntry, checksum
from .limits import DEFAULT_LIMITS, Limits
from .tar import BLOCK, header_for, member_header, padded

_ZEROS = bytes(BLOCK)  # tar padding
_BLOCKS_JSON = b".blocks.json"
_BLOCKS_JSON_SUM = sum(_BLOCKS_JSON)
ZSTD_LEVEL = 3  # payloads of ZSTD_SMALL bytes or more
# Small payloads (audio clips, text passages: most of them) at level 1 with a minimum match of 7:
# on the sample WAVs the same ratio as level 3 (0.701 vs 0.700) in 2/3 of the time; LZ matches
# are rare in PCM (the gain is the literals' entropy coding), so shorter ones are not searched for.
ZSTD_SMALL = 64 << 10
ZSTD_SMALL_LEVEL, ZSTD_SMALL_MIN_MATCH = 1, 7

def payload_member(key: str, i: int, block: Block | BlockInfo, zstd: bool) -> str:
    """The tar member name of block ``i``: ``KEY.I.MODE.EXT`` plus ``.zst`` when compressed."""
    return f"{key}.{i}.{block.mode}.{codec_info(block.codec).ext}" + (".zst" if zstd else "")


def header_member(key: str) -> str:
    """The tar member name of a sample's header: ``KEY.blocks.json``."""
    return f"{key}.blocks.json"


class SampleEncoder:
    """Turns a :class:`Sample` into its tar members (bytes) and index entry."""

    def __init__(self, level: int = ZSTD_LEVEL, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                              write_checksum=False)
        self._zstd_small = zstandard.ZstdCompressor(
            compression_params=zstandard.ZstdCompressionParameters.from_level(
                ZSTD_SMALL_LEVEL, min_match=ZSTD_SMALL_MIN_MATCH, write_content_size=True,
                write_checksum=False))

    def compress(self, payload: bytes) -> bytes:
        """The zstd frame of ``payload`` (SPEC.md, "Storage compression": the settings depend on
        its size only, so the same payload always gives the same bytes)."""
        z = self._zstd_small if len(payload) < ZSTD_SMALL else self._zstd
        return z.compress(payload)

    def encode_parts(self, sample: Sample, validated: bool = False
                     ) -> tuple[list[bytes], IndexEntry]:
        """Members of ``sample`` as a list of byte strings to write in order (no joined copy of
        the payloads) and its index entry, offsets relative to its start (``entry.size`` bytes).

        ``validated``: the caller vouches that the blocks have not changed since they were built
        (``Block.__post_init__`` validated their fields), so that check is not run twice.
        """
        return self.encode_indexed(sample, validated)[:2]

    def encode_indexed(self, sample: Sample, validated: bool = False
                       ) -> tuple[list[bytes], IndexEntry, tuple]:
        """:meth:`encode_parts` plus the entry's index text with its offsets left open
        (``headers.entry_template``), for :meth:`ShardWriter.write_encoded`."""
        key = check_key(sample.key)
        if len(sample.blocks) == 1:
            return self._encode_one(key, sample.blocks[0], validated)
        return self._encode_many(key, sample, validated)

    def _encode_many(self, key: str, sample: Sample, validated: bool
                     ) -> tuple[list[bytes], IndexEntry, tuple]:
        if len(sample.blocks) > self.limits.max_blocks:
            raise FormatError(f"{len(sample.blocks)} blocks > limit {self.limits.max_blocks}",
                              key=key)
        stored_list: list[bytes] = []
        infos: list[BlockInfo] = []
        for i, b in enumerate(sample.blocks):
            if not validated:
                b.validate(key=key, block=i)
            self.limits.check_shape(b.shape, key=key, block=i)
            self.limits.check_bytes(len(b.payload), "payload", key=key, block=i)
            stored, zstd = b.payload, False
            if codec_info(b.codec).zstd and b.payload:
                packed = self.compress(b.payload)
                if len(packed) < len(b.payload):
                    stored, zstd = packed, True
            stored_list.append(stored)
            infos.append(BlockInfo(b.mode, b.shape, b.codec, b.meta, len(b.payload), len(stored),
                                   zstd, checksum(stored)))
        cut: list[tuple[str, str]] = []
        header = header_bytes(key, infos, cut)
        parts = [member_header(header_member(key), len(header)), header,
                 b"\0" * (padded(len(header)) - len(header))]
        pos = BLOCK + padded(len(header))
        for i, (info, stored) in enumerate(zip(infos, stored_list)):
            parts.append(member_header(payload_member(key, i, info, info.zstd), len(stored)))
            info.offset = pos + BLOCK
            parts.append(stored)
            parts.append(b"\0" * (padded(len(stored)) - len(stored)))
            pos += BLOCK + padded(len(stored))
        return parts, IndexEntry(key, 0, pos, infos), entry_template(key, pos, infos, cut)

    def encode_packed(self, sample: Sample, validated: bool = False
                      ) -> tuple[list[bytes], int, tuple, tuple]:
        """``(members as byte strings, size, index template, totals)`` for
        :meth:`ShardWriter.write_packed`: :meth:`encode_indexed` without the index entry objects
        (``totals``: ``(mode, payload bytes, stored bytes)`` per block)."""
        key = check_key(sample.key)
        if len(sample.blocks) == 1:
            b = sample.blocks[0]
            if not validated:
                b.validate(key=key, block=0)
            parts, pos, template, info = self._one(key, b)
            return parts, pos, template, ((b.mode, len(b.payload), info[0]),)
        parts, entry, template = self._encode_many(key, sample, validated)
        return parts, entry.size, template, tuple((b.mode, b.size, b.stored) for b in entry.blocks)

    def encode_file(self, key: str, b: Block) -> tuple[list[bytes], int, tuple, tuple]:
        """:meth:`encode_packed` of a one-block sample whose block the format's constructors built
        (``image_file_block``, ...: its fields are valid); the key is checked here."""
        parts, pos, template, info = self._one(check_key(key), b)
        return parts, pos, template, ((b.mode, len(b.payload), info[0]),)

    def _encode_one(self, key: str, b: Block, validated: bool) -> tuple[list[bytes], IndexEntry,
                                                                        tuple]:
        if not validated:
            b.validate(key=key, block=0)
        parts, pos, template, (n, zstd, xxh, off) = self._one(key, b)
        block = BlockInfo(b.mode, b.shape, b.codec, b.meta, len(b.payload), n, zstd, xxh, off)
        return parts, IndexEntry(key, 0, pos, [block]), template

    def _one(self, key: str, b: Block) -> tuple[list[bytes], int, tuple, tuple]:
        """A one-block sample (most converted files), the layout written out: the same bytes
        as the general path (tests/formats/test_writer.py) for a fraction of its overhead.
        Returns ``(parts, size, template, (stored bytes, zstd, xxh3, data offset))``."""
        payload, shape, limits = b.payload, b.shape, self.limits
        size = len(payload)
        if len(shape) > limits.max_ndim or prod(shape) > limits.max_elements:
            limits.check_shape(shape, key=key, block=0)  # raises
        if size > limits.max_payload_bytes:
            limits.check_bytes(size, "payload", key=key, block=0)  # raises
        head, squeeze, names = block_head(b.mode, b.codec, b.meta)
        stored, zstd = payload, False
        if squeeze and size:
            packed = self.compress(payload)
            if len(packed) < size:
                stored, zstd = packed, True
        n = len(stored)
        xxh = xxh3_64_hexdigest(stored)
        dims = ",".join(map(str, shape))
        tail = (f'"shape":[{dims}],"size":{size},"stored":{n},"xxh3":"{xxh}",'
                f'"zstd":{"true" if zstd else "false"}}}')
        qkey = quoted(key)
        header = f'{{"blocklm":1,"blocks":[{head}{tail}],"key":{qkey}}}'.encode()
        hlen = len(header)
        hpad, pad = -hlen % BLOCK, -n % BLOCK
        off = 2 * BLOCK + hlen + hpad
        pos = off + n + pad
        kenc = key.encode("ascii")  # check_key: ASCII
        ksum = sum(kenc)
        suffix, suffix_sum = names[zstd]
        parts = [header_for(kenc + _BLOCKS_JSON, ksum + _BLOCKS_JSON_SUM, hlen), header,
                 _ZEROS[:hpad], header_for(kenc + suffix, ksum + suffix_sum, n), stored,
                 _ZEROS[:pad]]
        template = ((f'{{"blocks":[{head}"offset":', f',{tail}],"key":{qkey},"offset":',
                     f',"size":{pos}}}'), (off, 0))
        return parts, pos, template, (n, zstd, xxh, off)

    def encode(self, sample: Sample, validated: bool = False) -> tuple[bytes, IndexEntry]:
        """Members of ``sample`` as tar bytes and its index entry, offsets relative to its start
        (``validated``: see :meth:`encode_parts`)."""
        parts, entry = self.encode_parts(sample, validated)
        return b"".join(parts), entry
