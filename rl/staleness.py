"""The staleness budget (AReaL's rule): how many more prompt groups rollout may start right now.

With batch size B groups and bound eta, group number g may start only while g < (v + eta + 1) * B, where v
is the trainer's current version; so a group started at version v is trained by version v + eta at the
latest. eta = 0 is synchronous on-policy RL. Groups that are dropped (too stale when the trainer reaches
them) give their place back. Plain arithmetic, unit-tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessBudget:
    batch_groups: int
    eta: int
    max_running: int | None = None  # optional cap on groups generating at once
    submitted: int = 0  # groups ever started and not given back
    running: int = 0
    dropped: int = 0

    def capacity(self, version: int) -> int:
        """Groups that may start now at trainer version `version`."""
        cap = (self.eta + version + 1) * self.batch_groups - self.submitted
        if self.max_running is not None:
            cap = min(cap, self.max_running - self.running)
        return max(cap, 0)

    def on_submit(self, n: int = 1) -> None:
        self.submitted += n
        self.running += n

    def on_finish(self, n: int = 1) -> None:
        self.running -= n

    def on_drop(self, n: int = 1) -> None:
        """`n` finished groups were discarded as too stale: their slots may be used again."""
        self.submitted -= n
        self.dropped += n
