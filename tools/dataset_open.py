"""Openers for datasets given as a local path or a URL (``http(s)://``, ``s3://``, any fsspec
protocol): local paths use the format's ``local_opener``; URLs the pipeline's ``RemoteOpener``
(range reads with timeouts and retries)."""

from __future__ import annotations

from blocklm.formats.reader import Opener, local_opener


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def opener_for(path: str) -> Opener:
    """The opener that reads ``path``'s dataset."""
    if not is_url(path):
        return local_opener
    from blocklm.pipeline.sources import RemoteOpener

    return RemoteOpener()
