"""A one-line progress meter on stderr (bytes, percent, GB/s), shown only on a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total_bytes: int, enabled: bool | None = None):
        self.label = label
        self.total = max(total_bytes, 1)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, done_bytes: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self._last_draw < 0.1:
            return
        self._last_draw = now
        rate = done_bytes / max(now - self.start, 1e-9) / 1e9
        sys.stderr.write(
            f"\r{self.label}: {done_bytes / 1e6:,.1f} / {self.total / 1e6:,.1f} MB "
            f"({100 * done_bytes / self.total:.0f}%) {rate:.2f} GB/s"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
