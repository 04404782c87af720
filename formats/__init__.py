"""The block-list record format v1 (see SPEC.md beside this file) and its shard codecs."""

from .block import Block, Sample, canonical_json, check_key
from .errors import (
    ChecksumError,
    CodecError,
    FormatError,
    IndexMismatchError,
    LimitError,
    TruncatedShardError,
    UnsafeMemberError,
)
from .limits import DEFAULT_LIMITS, Limits

__all__ = [
    "Block", "Sample", "canonical_json", "check_key",
    "FormatError", "ChecksumError", "CodecError", "IndexMismatchError", "LimitError",
    "TruncatedShardError", "UnsafeMemberError", "Limits", "DEFAULT_LIMITS",
]
