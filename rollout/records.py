"""What the controller and a rollout worker exchange: typed records, not ad-hoc dicts.

A field read by the other side is a name in one of these classes; a rename breaks at the definition, not
in a KeyError at run time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rl.core.scoring import RewardStats


@dataclass
class GroupRequest:
    """One prompt to be sampled `n` times; sample j of group g is row g * n + j of the partition.
    `samples` limits the request to some j (a re-queue after an engine failure); None means all n."""

    group: int
    prompt: str
    prompt_ids: list[int]
    row: str  # the dataset row's other fields, as JSON
    n: int
    samples: list[int] | None = None

    def sample_ids(self) -> list[int]:
        return list(range(self.n)) if self.samples is None else list(self.samples)


@dataclass
class GroupResult:
    """What became of a group request (`RolloutWorker.generate_group`, `RolloutRouter.run_group`): sample
    numbers stored (`done`) and not (`failed`, with the engine's `error`), the tokens generated. The router
    re-queues `failed` samples elsewhere and sums the attempts."""

    group: int
    done: list[int]
    failed: list[int] = field(default_factory=list)
    error: str = ""
    tokens: int = 0
    actor_died: bool = False  # the worker's process is gone (not restarted in place; its samples move)
    attempts: int = 1


@dataclass
class EvalSample:
    """One scored sample of an eval prompt (`RolloutWorker.evaluate_group`): never stored, never trained."""

    prompt_no: int
    sample: int
    prompt: str
    response: str
    score: float
    reward_info: str  # the reward call's error, if any
    row: str  # the dataset row's other fields, as JSON
    finish_reason: str
    version: int  # its oldest token's policy version
    version_max: int  # its newest token's (a weight update may cut an eval request like any other)
    tokens: int
    worker: int


@dataclass
class UpdateReport:
    """One engine's side of a weight update (`RolloutWorker.update_weights`); seconds unless named."""

    rank: int
    version: int  # the version the engine now holds (the trainer's, read in band on a streaming channel)
    seconds: float  # the whole update in the actor: pause, receive + load, resume
    pause_seconds: float
    dispatch_seconds: float  # from the controller's call to the actor running it (a busy actor loop shows here)
    cut_requests: int  # in-flight requests the update cut (continued on the new weights)
    load_seconds: float  # the engine workers' receive + load
    recv_seconds: float  # waiting for bytes
    apply_seconds: float  # inside vLLM's loader
    bytes: int


@dataclass
class RolloutStats:
    """A rollout worker's counters since its start (the controller differences them per step)."""

    rank: int
    version: int
    inflight: int
    tokens_out: int
    samples_out: int
    cached_tokens: int
    resubmitted: int
    gc_seconds: float  # in Python's collector (rl/core/heap.py)
    gc_full: int
    loop_lag_max_s: float  # the longest the actor's event loop was held since the last stats call
    loop_stalls: list[dict[str, Any]] = field(default_factory=list)  # {"lag_s", "at", "stack"} of those holds
    reward: RewardStats = field(default_factory=RewardStats)  # reward.inline: what this worker scored
