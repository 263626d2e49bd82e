"""The background stages of one run, started beside the training loop and watched by it.

The feeder starts groups on the rollout router while the staleness budget allows; reward workers score
samples as they stream into the store (unless the rollout workers score them inline); with dynamic sampling
a filter drops signal-free groups; worker activity spans flow to the timeline; with `eval.every` eval rounds
run on the engines (rl.evaluation). `Stages` owns their tasks, reports the first failure to the loop (`error`),
and gathers their per-step metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from datastore.client import DataStore
from rl.evaluation import Evaluator
from rl.metrics import MetricsLogger
from rl.schedule import Feeder, GroupFilter, SpanCollector
from rl.core.staleness import StalenessBudget
from rl.core.waits import await_, died
from rl.reward_worker import death_cause
from rollout.records import RolloutStats
from rollout.router import RolloutRouter

log = logging.getLogger(__name__)


class Stages:
    """Starts and stops the background stages of one run, and gathers their per-step metrics.
    `requeue`: (group, missing sample numbers) to submit first (a resume's partial and lost groups);
    `reward_fn`: the recipe's reward.fn, named when a reward worker dies."""

    def __init__(self, feeder: Feeder, gfilter: GroupFilter | None, budget: StalenessBudget, router: RolloutRouter,
                 store: DataStore, rollouts: list[ray.actor.ActorHandle], rewarders: list[ray.actor.ActorHandle],
                 metrics: MetricsLogger, timeout_s: float, requeue: list[tuple[int, list[int]]] | None = None,
                 evaluator: Evaluator | None = None, reward_fn: str = "") -> None:
        self.feeder, self.gfilter, self.budget, self.router, self.store = feeder, gfilter, budget, router, store
        self.evaluator = evaluator
        self.rollouts, self.rewarders, self.metrics, self.timeout = rollouts, rewarders, metrics, timeout_s
        self.requeue = list(requeue or [])
        self.reward_fn = reward_fn  # named when a reward worker dies
        self.spans = SpanCollector(metrics, rollouts, rewarders, timeout_s)
        self.tasks: list[asyncio.Task] = []
        self.reward_refs: list[ray.ObjectRef] = []
        self.last = {"t": time.time(), "tokens": 0, "scored": 0, "errors": 0, "gc": 0.0}

    async def start(self) -> None:
        self.reward_refs = [w.run.remote() for w in self.rewarders]
        if self.evaluator is not None:  # before the feeder: the round at version 0 reaches the engines first
            self.evaluator.start()
        for g, missing in self.requeue:
            self.feeder.requeue(g, missing)
        self.tasks.append(asyncio.create_task(self.feeder.run()))
        if self.gfilter is not None:
            self.tasks.append(asyncio.create_task(self.gfilter.run()))

    def on_version(self, version: int) -> None:
        """The engines hold a new version: the feeder may start more groups; an eval round may be due."""
        self.feeder.wake.set()
        if self.evaluator is not None:
            self.evaluator.on_version(version)

    def error(self) -> tuple[str, BaseException] | None:
        """The first background failure as (stage, error), or None: the loop ends the run with it."""
        if self.feeder.error is not None:
            return "rollout", self.feeder.error
        dead = self._reward_error()
        if dead is not None:
            return dead
        if self.gfilter is not None and self.gfilter.error is not None:
            return "dynamic sampling", self.gfilter.error
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                return "a background stage", t.exception()
        return None

    def _reward_error(self) -> tuple[str, BaseException] | None:
        """A reward worker's run loop ends only when stopped: one that ended before is dead or failed (its
        function could not be imported, it raised, or the process exited); its error names it."""
        if not self.reward_refs:
            return None
        ended, _ = ray.wait(self.reward_refs, num_returns=len(self.reward_refs), timeout=0)
        for ref in ended:
            i = self.reward_refs.index(ref)
            try:
                ray.get(ref, timeout=0)
                why = "its run loop returned before the run stopped it"
                cause: BaseException | None = None
            except Exception as err:  # RayActorError (the process died) or the loop's own exception
                why, cause = death_cause(err), err
            exc = RuntimeError(f"{why} (reward.fn={self.reward_fn}; its log is above)")
            exc.__cause__ = cause
            return f"the reward stage (reward worker {i})", exc
        return None

    async def step_metrics(self, m: dict[str, Any]) -> dict[str, Any]:
        """Throughput of each stage since the last step, rewards' extras, queue depths, staleness budget."""
        now = time.time()
        dt = max(now - self.last["t"], 1e-9)
        rollout = await self._rollout_stats()
        rewards = await await_([w.stats.remote() for w in self.rewarders], self.timeout, "stats", "reward workers") \
            if self.rewarders else [s.reward for s in rollout]  # reward.inline: the rollout workers scored
        await self.spans.collect()
        tokens = sum(s.tokens_out for s in rollout)
        gc_s = max((s.gc_seconds for s in rollout), default=0.0)
        for s in rollout:  # a rollout actor's loop held for long delays every call to it (weight updates too)
            for st in s.loop_stalls[:1]:
                log.warning("rollout worker %d: its event loop was held for %.2f s; the loop thread was at:\n%s",
                            s.rank, st["lag_s"], st["stack"])
        scored, errors = sum(s.scored for s in rewards), sum(s.errors for s in rewards)
        out: dict[str, Any] = {
            "throughput/samples_per_s": m.get("samples", 0) / dt,
            "throughput/gen_tokens_per_s": max(0, tokens - self.last["tokens"]) / dt,  # 0 when a worker was replaced
            "throughput/rewarded_per_s": max(0, scored - self.last["scored"]) / dt,
            "reward/errors": max(0, errors - self.last["errors"]),
            "reward/abandoned_calls": sum(s.abandoned for s in rewards),  # so far: calls given up at their timeout
            "rollout/gc_pause_s": max(0.0, gc_s - self.last["gc"]),  # the busiest engine's collector pauses since the last step
            "rollout/loop_lag_max_s": max((s.loop_lag_max_s for s in rollout), default=0.0),
            "rollout/groups_running": self.budget.running, "rollout/groups_started": self.feeder.next_group,
            "rollout/groups_dropped": self.budget.dropped, "rollout/engine_failures": len(self.router.failures),
            "rollout/workers_replaced": sum(self.router.respawns),
            "rollout/engines_restarted": sum(self.router.engine_restarts),
        }
        extras: dict[str, list[float]] = {}
        for s in rewards:
            for k, (total, count) in s.extras.items():
                acc = extras.setdefault(k, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
        out.update({f"reward/extra/{k}": v[0] / v[1] for k, v in extras.items() if v[1]})
        if self.gfilter is not None:
            out.update({"dynamic_sampling/kept_groups": self.gfilter.kept, "dynamic_sampling/dropped_groups": self.gfilter.dropped})
        if self.evaluator is not None:
            out.update(await self.evaluator.take())
        try:
            out.update(await asyncio.to_thread(self.store.metrics))
        except Exception as exc:  # observability must not stop training
            log.warning("data store metrics unavailable: %s", exc)
        self.last = {"t": now, "tokens": tokens, "scored": scored, "errors": errors, "gc": gc_s}
        return out

    async def _rollout_stats(self) -> list[RolloutStats]:
        """The stats of every live rollout worker. One that died is handed to the router (which replaces it)
        and left out; one being replaced is left out until it is back. Counters restart with a new worker."""
        live = [i for i in range(len(self.rollouts)) if self.router.healthy[i]]
        answers = await asyncio.gather(*[await_(self.rollouts[i].stats.remote(), self.timeout, "stats",
                                                f"rollout worker {i}") for i in live], return_exceptions=True)
        out: list[RolloutStats] = []
        for i, a in zip(live, answers):
            if died(a):
                self.router.worker_died(i, str(a))
            elif isinstance(a, BaseException):
                raise a
            else:
                out.append(a)
        return out

    async def stop(self) -> None:
        if self.gfilter is not None:
            self.gfilter.stopping = True
        for t in self.tasks:
            t.cancel()
        self.feeder.stop()
        if self.evaluator is not None:
            self.evaluator.stop()
        for w in self.rewarders:
            w.stop.remote()
        try:
            await self.spans.collect()
        except Exception:
            pass
