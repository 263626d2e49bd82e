"""RolloutRouter: one front for many engines (data parallel), balancing by outstanding tokens.

Each group goes to the healthy engine with the fewest outstanding tokens (prompt tokens plus the most it
may generate, counted until the group returns). When an engine fails, the samples it had not finished are
re-queued on a healthy engine (its finished samples are already in the store: nothing is lost or made
twice) and the engine is restarted in the background; it gets work again after the next weight sync
brings it to the current policy version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import ray

from rl.core.waits import PeerDied, await_
from rollout.records import GroupRequest, GroupResult

log = logging.getLogger(__name__)


class NoHealthyEngine(RuntimeError):
    pass


class RolloutRouter:
    def __init__(self, workers: list[ray.actor.ActorHandle], max_tokens: int, timeout_s: float,
                 max_retries: int = 3) -> None:
        self.workers, self.max_tokens, self.timeout_s, self.max_retries = workers, max_tokens, timeout_s, max_retries
        self.outstanding = [0] * len(workers)  # tokens
        self.routed = [0] * len(workers)  # groups ever sent, for stats and tests
        self.healthy = [True] * len(workers)
        self.needs_weights = [False] * len(workers)  # restarted: excluded until the next weight sync
        self.restarts: dict[int, asyncio.Task] = {}
        self.failures: list[dict[str, Any]] = []

    def routable(self) -> list[int]:
        return [i for i in range(len(self.workers)) if self.healthy[i] and not self.needs_weights[i]]

    def pick(self) -> int:
        ok = self.routable()
        if not ok:
            raise NoHealthyEngine(f"no healthy rollout engine: failures so far {self.failures[-3:]}")
        return min(ok, key=lambda i: (self.outstanding[i], self.routed[i]))

    async def run_group(self, req: GroupRequest) -> GroupResult:
        """Generate the group somewhere; re-queue unfinished samples after an engine failure."""
        pending, done, tokens = req, [], 0
        for attempt in range(self.max_retries + 1):
            i = await self._pick_waiting()
            cost = len(pending.prompt_ids) * len(pending.sample_ids()) + self.max_tokens * len(pending.sample_ids())
            self.outstanding[i] += cost
            self.routed[i] += 1
            try:
                res = await await_(self.workers[i].generate_group.remote(pending), self.timeout_s,
                                   f"group {req.group} ({len(pending.sample_ids())} samples)", f"rollout worker {i}")
            except (PeerDied, ray.exceptions.RayActorError) as exc:  # the actor died (await_ raises PeerDied):
                # the request's samples go to another engine
                res = GroupResult(req.group, done=[], failed=pending.sample_ids(), error=f"actor died: {exc}",
                                  actor_died=True)
            finally:
                self.outstanding[i] -= cost
            done += res.done
            tokens += res.tokens
            if not res.failed:
                return GroupResult(req.group, done=sorted(done), tokens=tokens, attempts=attempt + 1)
            self._on_failure(i, req.group, res)
            pending = replace(req, samples=res.failed)
        raise NoHealthyEngine(f"group {req.group}: samples {pending.samples} still failing after "
                              f"{self.max_retries} re-queues; last error: {self.failures[-1]['error']}")

    async def _pick_waiting(self) -> int:
        """An engine to use, waiting (bounded) for a restart when none is healthy right now."""
        waited = 0.0
        while not self.routable():
            if not self.restarts and not any(self.needs_weights):
                raise NoHealthyEngine(f"every rollout engine is down: {self.failures[-3:]}")
            await asyncio.sleep(0.5)
            waited += 0.5
            if waited > self.timeout_s:
                raise NoHealthyEngine(f"no rollout engine came back within {self.timeout_s:.0f} s")
        return self.pick()

    def _on_failure(self, i: int, group: int, res: GroupResult) -> None:
        self.failures.append({"engine": i, "group": group, "error": res.error, "samples": res.failed})
        log.error("rollout engine %d failed on group %d (%s); re-queueing samples %s", i, group, res.error, res.failed)
        if self.healthy[i]:
            self.healthy[i] = False
            if not res.actor_died:
                self.restarts[i] = asyncio.create_task(self._restart(i))

    async def _restart(self, i: int) -> None:
        try:
            await await_(self.workers[i].restart_engine.remote(), self.timeout_s, "engine restart", f"rollout worker {i}")
            self.healthy[i], self.needs_weights[i] = True, True
            log.warning("rollout engine %d restarted; it rejoins after the next weight sync", i)
        except Exception as exc:
            log.error("rollout engine %d could not be restarted: %s", i, exc)
        finally:
            self.restarts.pop(i, None)

    def weights_synced(self, engines: list[int]) -> None:
        """The controller pushed the current weights to these engines: they may take work again."""
        for i in engines:
            self.needs_weights[i] = False

    def stats(self) -> dict[str, Any]:
        return {"outstanding_tokens": list(self.outstanding), "routed_groups": list(self.routed),
                "healthy": list(self.healthy), "failures": len(self.failures)}
