"""Retrying transient failures with capped exponential backoff, bounded in count and time."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How a remote read retries: ``retries`` failures in a row without progress, waits that start
    at ``backoff`` seconds and double up to ``max_backoff``, and at most ``deadline`` seconds for
    one read in all (so a read never hangs, whatever the server does)."""

    retries: int = 5
    backoff: float = 0.1
    max_backoff: float = 5.0
    deadline: float = 600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))


class Attempts:
    """Counts failures of one read; resets the count when a retry made progress.

    ``failed(progress)`` sleeps the backoff and returns True to retry, False to give up. The total
    number of failures is capped too (``retries`` per megabyte of progress, at least ``retries``),
    so a server that hands out a few bytes per connection cannot keep a read alive forever.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.in_a_row = 0
        self.total = 0
        self.start = time.monotonic()

    def failed(self, progressed: bool, done_bytes: int = 0) -> bool:
        p = self.policy
        self.in_a_row = 1 if progressed else self.in_a_row + 1
        self.total += 1
        cap = p.retries * (1 + done_bytes // (1 << 20)) + p.retries
        if self.in_a_row > p.retries or self.total > cap:
            return False
        wait = p.delay(self.in_a_row)
        if time.monotonic() - self.start + wait > p.deadline:
            return False
        time.sleep(wait)
        return True
