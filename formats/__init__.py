"""The block-list record format v1 (see SPEC.md beside this file) and its shard codecs.

Write with :class:`ShardWriter`, read with :class:`ShardReader`, :func:`iter_dataset` and
:func:`iter_index` (shapes from the indexes alone), build blocks with the constructors of
:mod:`blocklm.formats.codecs` and decode them with ``block.decode()``.
"""

from .block import Block, Sample, canonical_json, check_key
from .codecs import (
    audio_file_block,
    bytes_block,
    decode_block,
    image_file_block,
    pcm_block,
    raw_image_block,
    text_block,
    tokens_block,
)
from .errors import (
    ChecksumError,
    CodecError,
    CodecUnavailableError,
    FormatError,
    IndexMismatchError,
    LimitError,
    MissingFileError,
    TruncatedShardError,
    UnsafeMemberError,
)
from .index import BlockInfo, IndexEntry, Manifest, ShardIndex, ShardInfo, checksum
from .integrity import check_integrity
from .limits import DEFAULT_LIMITS, Limits
from .reader import (
    ByteSource,
    DatasetShard,
    LocalSource,
    ShardReader,
    build_index,
    iter_dataset,
    iter_index,
    load_index,
    read_manifest,
    resolve_dataset,
    scan_shard,
)
from .writer import ShardWriter, index_name, shard_name

__all__ = [
    "Block", "Sample", "canonical_json", "check_key",
    "audio_file_block", "bytes_block", "decode_block", "image_file_block", "pcm_block",
    "raw_image_block", "text_block", "tokens_block", "check_integrity",
    "FormatError", "ChecksumError", "CodecError", "CodecUnavailableError", "IndexMismatchError", "LimitError",
    "MissingFileError",
    "TruncatedShardError", "UnsafeMemberError", "Limits", "DEFAULT_LIMITS",
    "BlockInfo", "IndexEntry", "Manifest", "ShardIndex", "ShardInfo", "checksum",
    "ByteSource", "DatasetShard", "LocalSource", "ShardReader", "build_index", "iter_dataset",
    "iter_index", "load_index", "read_manifest", "resolve_dataset", "scan_shard",
    "ShardWriter", "index_name", "shard_name",
]
