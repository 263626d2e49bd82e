"""RewardWorker: a CPU Ray actor that scores finished samples as they stream through the data store.

It takes whatever finished samples are ready (up to a batch), scores each with the user's function
(concurrently, each call with its own timeout), and writes `reward` and `reward_info` back to the rows.
Several workers share the consumer name "reward", so each sample is scored once.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

import ray

from datastore.client import DataStore
from rl.core.config import RewardConfig
from rl.core.scoring import RewardStats, RewardTally, Sample, make_reward_caller

log = logging.getLogger(__name__)

READ_FIELDS = ["prompt", "response", "prompt_ids", "response_ids", "row", "finish_reason"]
CONSUMER = "reward"


class RewardWorker:
    def __init__(self, rank: int, cfg: RewardConfig, store: DataStore, partition: str, batch: int = 64) -> None:
        self.rank, self.cfg, self.store, self.partition, self.batch = rank, cfg, store, partition, batch
        self.caller = make_reward_caller(cfg)
        self.stopping = False
        self.tally = RewardTally()
        self.busy_s = 0.0
        self.spans: list[dict[str, Any]] = []

    async def run(self) -> dict[str, Any]:
        """Score samples until `stop()`; returns totals."""
        while not self.stopping:
            take = await self.store.atake(CONSUMER, self.partition, READ_FIELDS, self.batch, min_n=1, timeout=1.0)
            if take is None:
                continue
            t0 = time.perf_counter()
            table = await self.store.afetch(self.partition, take, READ_FIELDS)
            rows = table.to_pylist()
            samples = [_sample(r) for r in rows]
            results = await self.caller.score_many(samples)
            await self.store.aput(self.partition, [r["index"] for r in rows], self.tally.add(samples, results))
            self.busy_s += time.perf_counter() - t0
            self.spans.append({"kind": "reward", "start": time.time() - (time.perf_counter() - t0), "end": time.time()})
        return await self.stats()

    async def drain_spans(self) -> list[dict[str, Any]]:
        out, self.spans = self.spans, []
        return out

    async def stop(self) -> None:
        self.stopping = True

    async def stats(self) -> RewardStats:
        out = self.tally.stats()
        out.busy_s, out.abandoned = self.busy_s, self.caller.abandoned
        return out


def death_cause(exc: BaseException) -> str:
    """One line for why a worker's call ended: Ray's actor errors are a page (ids, pid, the creation task's
    traceback, OOM advice); keep the user's exception, or how the process exited."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*?:", ln)]
    if "creation task" in text and raised:
        return f"it could not start: {raised[-1]}"
    exit_detail = re.search(r"Worker exit detail: (.*?)(\.|$)", text)
    if exit_detail:
        return f"its process died ({exit_detail.group(1)})"
    return raised[-1] if raised else (lines[0] if lines else type(exc).__name__)


def _sample(r: dict[str, Any]) -> Sample:
    return Sample(prompt=r["prompt"], response=r["response"], prompt_ids=r["prompt_ids"],
                  response_ids=r["response_ids"], row=json.loads(r["row"]) if r["row"] else {},
                  index=r["index"], finish_reason=r["finish_reason"])


# no task events: Ray's GCS would keep one per call of this actor's methods, all run long (issue 19)
RewardActor = ray.remote(num_cpus=0, max_concurrency=100, enable_task_events=False)(RewardWorker)
