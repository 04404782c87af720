"""The conversion's progress bar (files, MB/s, ETA) on stderr when it is a terminal, and its
rejection lines (always printed: one clear line per rejected input)."""

from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar shown only when stderr is a terminal and not ``quiet``."""

    def __init__(self, quiet: bool, initial: int = 0, total: int | None = None) -> None:
        self.bar = None
        self.bytes = 0
        self.t0 = time.perf_counter()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="file", file=sys.stderr,
                            smoothing=0.1)

    def update(self, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(1)
            rate = self.bytes / 1e6 / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{rate:.1f} MB/s", refresh=False)

    def reject(self, source: str, reason: str) -> None:
        line = f"rejected: {source}: {reason}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
