"""Shared helpers for the format tests: real corpus files read in place."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"


@pytest.fixture(scope="session")
def corpora() -> Path:
    if not CORPORA.is_dir():
        pytest.skip(f"sample corpora not found at {CORPORA}")
    return CORPORA
