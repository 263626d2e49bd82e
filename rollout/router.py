"""RolloutRouter: one front for many engines (data parallel), balancing by outstanding tokens.

Each group goes to the healthy engine with the fewest outstanding tokens (prompt tokens plus the most it
may generate, counted until the group returns). When an engine fails, the samples it had not finished are
re-queued on a healthy engine (its finished samples are already in the store: nothing is lost or made
twice), or wait for one to come back. A dead engine (its EngineCore process) is restarted inside its
rollout worker; a dead rollout worker (the actor's process) is replaced by a new one (`respawn`, given by
the controller), at most `max_respawns` times per engine. Either gets work again once a weight sync has
brought it to the current policy version (`waiting_for_weights` tells the controller one is due).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any, Awaitable, Callable, Optional

import ray

from rl.core.waits import PeerDied, await_, died
from rollout.records import GroupRequest, GroupResult

log = logging.getLogger(__name__)


class NoHealthyEngine(RuntimeError):
    pass


class RolloutRouter:
    def __init__(self, workers: list[ray.actor.ActorHandle], max_tokens: int, timeout_s: float,
                 max_retries: int = 3,
                 respawn: Optional[Callable[[int], Awaitable[ray.actor.ActorHandle]]] = None,
                 max_respawns: int = 3) -> None:
        """`workers` is shared with the rest of the run (sync, stats, watchdog): a respawned worker replaces
        its dead one in place. `respawn(i)` starts a new rollout worker for engine i and returns it."""
        self.workers, self.max_tokens, self.timeout_s, self.max_retries = workers, max_tokens, timeout_s, max_retries
        self.respawn, self.max_respawns = respawn, max_respawns
        self.respawns = [0] * len(workers)  # replacements of each engine's worker so far
        self.engine_restarts = [0] * len(workers)  # restarts of each engine inside its worker so far
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
            worker = self.workers[i]
            try:
                res = await await_(worker.generate_group.remote(pending), self.timeout_s,
                                   f"group {req.group} ({len(pending.sample_ids())} samples)", f"rollout worker {i}")
            except (PeerDied, ray.exceptions.RayActorError) as exc:
                if not died(exc):  # the worker lives and raised it (a storage unit died, say): another engine
                    raise  # would fail the same way
                # the worker's process died: the request's samples go to another engine
                res = GroupResult(req.group, done=[], failed=pending.sample_ids(), error=f"actor died: {exc}",
                                  actor_died=True)
            finally:
                self.outstanding[i] -= cost
            done += res.done
            tokens += res.tokens
            if not res.failed:
                return GroupResult(req.group, done=sorted(done), tokens=tokens, attempts=attempt + 1)
            self._on_failure(i, req.group, res, worker)
            pending = replace(req, samples=res.failed)
        raise NoHealthyEngine(f"group {req.group}: samples {pending.samples} still failing after "
                              f"{self.max_retries} re-queues; last error: {self.failures[-1]['error']}")

    def waiting_for_weights(self) -> bool:
        """An engine is back (restarted or replaced) and gets no work until a weight sync reaches it."""
        return any(h and w for h, w in zip(self.healthy, self.needs_weights))

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

    def _on_failure(self, i: int, group: int, res: GroupResult, worker: ray.actor.ActorHandle) -> None:
        self.failures.append({"engine": i, "group": group, "error": res.error, "samples": res.failed})
        log.error("rollout engine %d failed on group %d (%s); re-queueing samples %s", i, group, res.error, res.failed)
        if res.actor_died:
            self.worker_died(i, res.error, worker)
        else:
            self.engine_failed(i, res.error)

    def engine_failed(self, i: int, why: str) -> None:
        """Engine i (its vLLM EngineCore) died but its rollout worker lives: the worker restarts it in place."""
        if self.healthy[i] and i not in self.restarts:
            log.error("rollout engine %d is down (%s); restarting it", i, why)
            self.healthy[i] = False
            self.restarts[i] = asyncio.create_task(self._restart(i))

    def worker_died(self, i: int, why: str, worker: Optional[ray.actor.ActorHandle] = None) -> None:
        """Rollout worker i's process is gone (seen by a group, a weight sync or a stats call): it takes no
        work, and a new worker is started in its place while respawns are left (call from the event loop).
        `worker`: the handle that failed; a failure of a worker already replaced is ignored."""
        if i in self.restarts or (worker is not None and worker is not self.workers[i]):
            return
        self.healthy[i] = False
        if self.respawn is None:
            return
        if self.respawns[i] >= self.max_respawns:
            log.error("rollout worker %d died again (%s); it was replaced %d times already "
                      "(resources.max_restarts=%d): it stays down", i, why, self.respawns[i], self.max_respawns)
            return
        self.respawns[i] += 1
        log.error("rollout worker %d died (%s); starting a new one in its place (%d/%d)", i, why,
                  self.respawns[i], self.max_respawns)
        self.restarts[i] = asyncio.create_task(self._replace(i))

    async def _replace(self, i: int) -> None:
        try:
            assert self.respawn is not None
            self.workers[i] = await self.respawn(i)
            self.healthy[i], self.needs_weights[i] = True, True
            log.warning("rollout worker %d replaced; it rejoins after the next weight sync", i)
        except Exception as exc:
            log.error("rollout worker %d could not be replaced: %s", i, exc)
            self.failures.append({"engine": i, "group": -1, "error": f"replacement failed: {exc}", "samples": []})
        finally:
            self.restarts.pop(i, None)

    async def _restart(self, i: int) -> None:
        try:
            await await_(self.workers[i].restart_engine.remote(), self.timeout_s, "engine restart", f"rollout worker {i}")
            self.healthy[i], self.needs_weights[i] = True, True
            self.engine_restarts[i] += 1
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
                "healthy": list(self.healthy), "failures": len(self.failures), "respawns": list(self.respawns),
                "engine_restarts": list(self.engine_restarts)}
