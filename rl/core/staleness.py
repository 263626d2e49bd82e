"""The staleness rule, written once, and the admission budget built on it (AReaL's rule).

The rule: a sample made by policy version v may be trained at step s only if s - eta <= v <= s. The lower
bound is the staleness bound (eta = 0 is synchronous on-policy RL). The upper bound holds by construction
in a live run (the policy being trained is the newest there is); it fails only for samples made by versions
a crash lost: resuming at step S from a checkpoint, versions above S never existed in the resumed run.

Two places apply it: admission (`StalenessBudget`: rollout may start a group only if the step that will
train it is at most `last_trainable_step` of the current version) and consumption (the trainer claims
samples of version >= `oldest_trainable(step)` and drops older ones; a resume drops what is newer).
Plain arithmetic, unit-tested without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


def oldest_trainable(step: int, eta: int) -> int:
    """The oldest policy version whose samples step `step` may train on."""
    return step - eta


def newest_trainable(step: int) -> int:
    """The newest policy version whose samples step `step` may train on: the policy being trained (a newer
    one exists only in a lineage lost with a crash)."""
    return step


def trainable(version: int, step: int, eta: int) -> bool:
    """Whether a sample made by policy `version` may be trained at step `step`."""
    return oldest_trainable(step, eta) <= version <= newest_trainable(step)


def last_trainable_step(version: int, eta: int) -> int:
    """The last step that may train a sample of policy `version` (the inverse of `oldest_trainable`)."""
    return version + eta


@dataclass
class StalenessBudget:
    """How many more prompt groups rollout may start now. With B groups a step, steps 0..s train groups
    0..(s + 1) * B - 1, so at trainer version v group number g may start only while
    g < (last_trainable_step(v) + 1) * B: whatever starts now is trained in time. Groups dropped (too stale
    when the trainer reached them, or signal-free) give their place back."""

    batch_groups: int
    eta: int
    max_running: int | None = None  # optional cap on groups generating at once
    submitted: int = 0  # groups ever started and not given back
    running: int = 0
    dropped: int = 0

    def capacity(self, version: int) -> int:
        """Groups that may start now at trainer version `version`."""
        cap = (last_trainable_step(version, self.eta) + 1) * self.batch_groups - self.submitted
        if self.max_running is not None:
            cap = min(cap, self.max_running - self.running)
        return max(cap, 0)

    def restore(self, submitted: int) -> None:
        """A resume: the groups already started and not given back (trained steps' and those held)."""
        self.submitted = submitted

    def on_submit(self, n: int = 1) -> None:
        self.submitted += n
        self.running += n

    def on_finish(self, n: int = 1) -> None:
        self.running -= n

    def on_drop(self, n: int = 1) -> None:
        """`n` finished groups were discarded (too stale, or signal-free): their slots may be used again."""
        self.submitted -= n
        self.dropped += n
