"""Rates for the store's observability: totals since start and over a recent window, cheap to update."""

from __future__ import annotations

import time
from collections import deque
from typing import Any


class RateMeter:
    """Counts events (rows) and an amount (bytes); reports per-second rates since start and over the
    last `window_s` seconds. Per-second buckets, so an update is O(1) and memory is O(window_s)."""

    def __init__(self, window_s: float = 30.0, now: float | None = None) -> None:
        self.window_s = max(1.0, float(window_s))
        self.t0 = time.monotonic() if now is None else now
        self.count = 0
        self.amount = 0
        self.buckets: deque[list[float]] = deque()  # [second, count, amount]

    def add(self, count: int, amount: int = 0, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.count += count
        self.amount += amount
        sec = float(int(now))
        if self.buckets and self.buckets[-1][0] == sec:
            self.buckets[-1][1] += count
            self.buckets[-1][2] += amount
        else:
            self.buckets.append([sec, count, amount])
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] < now - self.window_s:
            self.buckets.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        self._trim(now)
        elapsed = max(now - self.t0, 1e-9)
        span = min(self.window_s, elapsed)
        wc = sum(b[1] for b in self.buckets)
        wa = sum(b[2] for b in self.buckets)
        return {
            "rows": self.count, "bytes": self.amount,
            "rows_per_s": self.count / elapsed, "bytes_per_s": self.amount / elapsed,
            "window_s": span, "window_rows_per_s": wc / max(span, 1e-9), "window_bytes_per_s": wa / max(span, 1e-9),
        }


def merge(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum of rate snapshots of meters that ran side by side (e.g. one per storage unit)."""
    out: dict[str, Any] = {}
    for s in snaps:
        for k, v in s.items():
            if k == "window_s":
                out[k] = max(out.get(k, 0.0), v)
            else:
                out[k] = out.get(k, 0) + v
    return out
