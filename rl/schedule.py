"""The background stages of the asynchronous schedule, each a small object the controller starts and stops.

- `Feeder`: draws prompts and starts groups on the rollout router whenever the staleness budget has room.
- `GroupFilter` (DAPO dynamic sampling): drops groups whose rewards are all equal (no learning signal)
  and gives their slots back, so the feeder draws more prompts and every training batch is full.
- `Colocation` (placement timeshare, eta = 0): engines sleep while the trainer steps, wake for the next rollout.
- `SpanCollector`: gathers worker activity spans (generating, loading weights, scoring) for the timeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Callable

import ray

from datastore.client import DataStore
from rl.core.config import Recipe
from rl.data import PromptFormatter, PromptStream, row_to_json
from rl.core.staleness import StalenessBudget
from rl.core.waits import await_
from rollout.router import RolloutRouter
from rollout.records import GroupRequest

log = logging.getLogger(__name__)

FILTER = "filter"


class Feeder:
    """Starts groups while the budget allows; never waits for training. Group g uses prompt row g."""

    def __init__(self, recipe: Recipe, budget: StalenessBudget, prompts: PromptStream, fmt: PromptFormatter,
                 tokenizer: Any, router: RolloutRouter, version: Callable[[], int]) -> None:
        self.recipe, self.budget, self.prompts, self.fmt = recipe, budget, prompts, fmt
        self.tokenizer, self.router, self.version = tokenizer, router, version
        self.wake = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.error: BaseException | None = None
        self.next_group = 0

    async def run(self) -> None:
        try:
            while True:
                for _ in range(self.budget.capacity(self.version())):
                    group = self.next_group
                    self.next_group += 1
                    self._submit(self._request(group, self.prompts.take(1)[0]))
                self.wake.clear()
                await self.wake.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            raise

    def resume_at(self, next_group: int) -> None:
        """A resume: new groups continue after the last one in the store's log (group g uses prompt row g)."""
        self.next_group = next_group
        self.prompts.seek(next_group)

    def requeue(self, group: int, samples: list[int]) -> None:
        """Start the listed samples (their numbers in the group) of an earlier group again: samples a
        crash lost. Takes a budget slot like a new group."""
        self._submit(self._request(group, self.prompts.row_at(group), samples))

    def _request(self, group: int, row: dict, samples: list[int] | None = None) -> GroupRequest:
        prompt = self.fmt(row)
        ids = self.tokenizer(prompt, add_special_tokens=not self.recipe.data.chat_template)["input_ids"]
        return GroupRequest(group=group, prompt=prompt, prompt_ids=ids, row=row_to_json(row),
                            n=self.recipe.rollout.group_size, samples=samples)

    def _submit(self, req: GroupRequest) -> None:
        self.budget.on_submit()
        task = asyncio.create_task(self._one(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, req: GroupRequest) -> None:
        try:
            await self.router.run_group(req)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the loop ends the run with it (Stages.error); re-raising would only log it again
            if self.error is None:
                self.error = exc
        finally:
            self.budget.on_finish()
            self.wake.set()

    def stop(self) -> None:
        for t in list(self.tasks):
            t.cancel()


class GroupFilter:
    """Dynamic sampling: a stage between reward and train. Accepted groups get `accepted` = 1 (the trainer
    waits for that field); groups with equal rewards are discarded for the trainer and their budget slots
    come back. Gives up with a clear error if a long run of groups all carry no signal."""

    def __init__(self, store: DataStore, partition: str, group_size: int, budget: StalenessBudget,
                 wake: Callable[[], None], max_drops_in_a_row: int) -> None:
        self.store, self.partition, self.n, self.budget, self.wake = store, partition, group_size, budget, wake
        self.max_drops = max_drops_in_a_row
        self.kept = self.dropped = self.drops_in_a_row = 0
        self.stopping = False
        self.error: BaseException | None = None

    async def run(self) -> None:
        try:
            while not self.stopping:
                take = await self.store.atake(FILTER, self.partition, ["reward"], 64 * self.n, min_n=self.n,
                                              group_size=self.n, timeout=1.0)
                if take is None:
                    continue
                table = await self.store.afetch(self.partition, take, ["reward"])
                by_group: dict[int, list[tuple[int, float]]] = defaultdict(list)
                for i, r in zip(table.column("index").to_pylist(), table.column("reward").to_pylist()):
                    by_group[i // self.n].append((i, r))
                keep, drop = [], []
                for rows in by_group.values():
                    rewards = [r for _, r in rows]
                    (drop if max(rewards) - min(rewards) < 1e-9 else keep).extend(i for i, _ in rows)
                if keep:
                    await self.store.aput(self.partition, keep, {"accepted": [1] * len(keep)})
                if drop:
                    await self.store.adiscard("trainer", self.partition, None, indexes=drop)
                    self.budget.on_drop(len(drop) // self.n)
                    self.wake()
                self._count(len(keep) // self.n, len(drop) // self.n)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            raise

    def _count(self, kept: int, dropped: int) -> None:
        self.kept += kept
        self.dropped += dropped
        self.drops_in_a_row = 0 if kept else self.drops_in_a_row + dropped
        if self.drops_in_a_row > self.max_drops:
            raise RuntimeError(
                f"dynamic sampling dropped {self.drops_in_a_row} groups in a row: every group's rewards were all "
                f"equal (all solved or all failed), so no batch can fill. Check the reward function, or turn "
                f"algorithm.dynamic_sampling off")


class Colocation:
    """Placement timeshare (eta = 0, engines and trainer on the same GPUs): before a train step, wait for
    the step's groups to finish and put the engines to sleep; after the weight sync, wake them (the sync
    itself wakes the weights when they were dropped)."""

    def __init__(self, enabled: bool, workers: list[ray.actor.ActorHandle], budget: StalenessBudget,
                 level: int, timeout_s: float, busy: Callable[[], bool] = lambda: False) -> None:
        """`busy`: other work on the engines that must end before they sleep (an eval round)."""
        self.enabled, self.workers, self.budget, self.level, self.timeout = enabled, workers, budget, level, timeout_s
        self.busy = busy
        self.asleep = False

    async def wait_rollout(self, version: int) -> None:
        """Until the step's groups have all been started and have finished (with eta = 0 they are all the
        budget allows), and the engines' other work (`busy`) has ended."""
        if not self.enabled:
            return
        t0 = time.monotonic()
        while self.budget.running or self.budget.capacity(version) or self.busy():
            if time.monotonic() - t0 > self.timeout:
                raise TimeoutError(f"placement timeshare: {self.budget.running} groups still generating"
                                   f"{' and an eval round running' if self.busy() else ''} after "
                                   f"{self.timeout:.0f} s; cannot put the engines to sleep for training")
            await asyncio.sleep(0.005)

    async def sleep(self) -> None:
        if not self.enabled:
            return
        await await_([w.sleep.remote(self.level) for w in self.workers], self.timeout, f"sleep (level {self.level})",
                     "rollout workers")
        self.asleep = True

    async def after_sync(self) -> None:
        if self.enabled and self.asleep:
            await await_([w.wake_up.remote(None) for w in self.workers], self.timeout, "wake-up", "rollout workers")
            self.asleep = False


class SpanCollector:
    """Pulls activity spans from rollout and reward workers into the run's timeline."""

    def __init__(self, metrics: Any, rollouts: list[ray.actor.ActorHandle], rewarders: list[ray.actor.ActorHandle],
                 timeout_s: float) -> None:
        self.metrics, self.rollouts, self.rewarders, self.timeout = metrics, rollouts, rewarders, timeout_s

    async def collect(self) -> None:
        actors = [(f"rollout/{i}", w) for i, w in enumerate(self.rollouts)] + \
                 [(f"reward/{i}", w) for i, w in enumerate(self.rewarders)]
        results = await asyncio.gather(*[await_(w.drain_spans.remote(), self.timeout, "activity spans", name)
                                         for name, w in actors], return_exceptions=True)
        for (name, _), spans in zip(actors, results):
            if isinstance(spans, BaseException):
                continue  # a dead worker has no spans; its failure is reported where it matters
            for s in spans:
                self.metrics.span(name, s["kind"], s["start"], s["end"])
