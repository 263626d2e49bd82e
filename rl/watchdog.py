"""The watchdog: when the loop makes no progress, say which actor is stuck and where.

A step that has not finished after `resources.stall_warn_s` makes the watchdog ask every trainer rank and
rollout worker for a sign of life, each with a short timeout of its own. A trainer rank answers on a thread
of its own (Ray concurrency group "watch") even while its step runs, with its main thread's Python stack;
a rollout worker answers from its event loop with its counters and the last holds of that loop. An actor
that does not answer within `PING_S` is stopped (SIGSTOP), frozen outside Python, or on a lost node. The
diagnosis is logged then, again every `stall_warn_s`, and joined to the error when the wait finally times
out, so that error names the stuck actor instead of only what was awaited."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

log = logging.getLogger(__name__)

PING_S = 5.0  # how long a live actor gets to answer


class Watchdog:
    def __init__(self, trainer_ranks: list[ray.actor.ActorHandle], rollouts: list[ray.actor.ActorHandle],
                 stall_warn_s: float) -> None:
        self.trainer_ranks, self.rollouts, self.stall_warn_s = trainer_ranks, rollouts, stall_warn_s
        self.last: str = ""  # the latest diagnosis, for the final error

    async def watch(self, what: str, started: float, warned: float) -> float:
        """Call while `what` (started at `started`, monotonic) is awaited; logs a diagnosis each time another
        `stall_warn_s` passes. Returns when it last warned (pass it back in)."""
        now = time.monotonic()
        if self.stall_warn_s <= 0 or now - max(started, warned) < self.stall_warn_s:
            return warned
        self.last = await self.diagnose()
        log.warning("%s has made no progress for %.0f s (resources.stall_warn_s=%g); %s", what, now - started,
                    self.stall_warn_s, self.last)
        return time.monotonic()

    async def diagnose(self) -> str:
        """One line per actor that did not answer, then where each trainer rank is."""
        calls = [(f"trainer rank {r}", a.where.remote()) for r, a in enumerate(self.trainer_ranks)]
        calls += [(f"rollout worker {i}", a.stats.remote()) for i, a in enumerate(self.rollouts)]
        answers = await asyncio.gather(*[_ask(ref) for _, ref in calls])
        silent = [name for (name, _), (ok, _) in zip(calls, answers) if not ok]
        parts = [f"{', '.join(silent)} did not answer within {PING_S:.0f} s (stopped, stuck outside Python, or on a "
                 "lost node): the run waits on " + ("it" if len(silent) == 1 else "them")] if silent else \
            ["every trainer rank and rollout worker answered"]
        for (name, _), (ok, got) in zip(calls, answers):
            if ok and name.startswith("trainer"):
                parts.append(f"{name} is at:\n{got}")
            elif ok and getattr(got, "loop_stalls", None):
                parts.append(f"{name}'s event loop was held {got.loop_stalls[-1]['lag_s']:.1f} s at:\n"
                             f"{got.loop_stalls[-1]['stack']}")
        return "\n".join(parts)


async def _ask(ref: ray.ObjectRef) -> tuple[bool, Any]:
    try:
        return True, await asyncio.wait_for(asyncio.wrap_future(ref.future()), PING_S)
    except Exception as exc:  # no answer (timeout) or a dead actor: both are the news
        return False, exc
