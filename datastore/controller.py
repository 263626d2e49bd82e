"""The store's control plane: which fields of which rows are ready, and which consumer took which rows.

It holds metadata only (a few bytes a row); payloads live in storage units and go straight from a unit to
its consumer. The bookkeeping is `datastore.ledger.Ledger` (unit-tested without Ray); `StoreController`
is the async Ray actor around it: a waiting consumer awaits a condition (woken only when a row it could
take appeared) instead of polling, expired leases are released by a timer that sleeps until the next
deadline, evicted rows are sent to their units, and takes by durable consumers are logged before they are
answered.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import ray

from datastore.ledger import OPS, Evicted, IndexSet, Ledger, Take  # noqa: F401  (Take, OPS: public names)
from datastore.log import ConsumptionLog
from datastore.stats import RateMeter
from rl.core.waits import await_


# no task events: Ray's GCS would keep one per call of this actor's methods, all run long (issue 19)
@ray.remote(num_cpus=0, max_concurrency=1000, enable_task_events=False)
class StoreController:
    """Async actor: units report readiness here; consumers wait here for ready rows."""

    def __init__(self, declared_fields: list[str] | None = None, tag_fields: list[str] | None = None,
                 required_consumers: list[str] | None = None, finished_fields: list[str] | None = None,
                 durable_consumers: list[str] | None = None, log_dir: str | None = None,
                 log_fsync: bool = False, lease_s: float = 600.0, stats_window_s: float = 30.0) -> None:
        declared = list(declared_fields or [])
        finished = declared if finished_fields is None else list(finished_fields)
        self.ledger = Ledger(required_consumers or [], finished, declared, tag_fields, lease_s)
        self.durable = set(required_consumers or []) if durable_consumers is None else set(durable_consumers)
        self.log_dir, self.log_fsync = log_dir, log_fsync
        self.clog: ConsumptionLog | None = None  # opened by open_log(), after recovery rewrote the old one
        self.units: list[ray.actor.ActorHandle] = []
        self.changed = asyncio.Condition()
        self.lease_added: asyncio.Event | None = None
        self.janitor: asyncio.Task | None = None
        self.t0 = time.monotonic()
        self.waiting_takes = 0
        self.put_meter = RateMeter(stats_window_s)
        self.take_meter = RateMeter(stats_window_s)

    async def ping(self) -> bool:
        return True

    async def set_units(self, units: list[ray.actor.ActorHandle]) -> None:
        self.units = list(units)

    async def open_log(self) -> None:
        if self.log_dir and self.clog is None:
            self.clog = ConsumptionLog(self.log_dir, self.log_fsync)

    # ------------------------------------------------------------------ writes
    async def register_types(self, partition: str, types: dict[str, Any]) -> dict[str, Any]:
        return self.ledger.register_types(partition, types)

    async def mark_ready(self, partition: str, indexes: list[int], fields: list[str], unit: int,
                         tags: dict[str, list[Any]], nbytes: int = 0) -> list[int]:
        """A unit stored `fields` of `indexes`; returns the rows refused because they were evicted."""
        refused, evicted = self.ledger.mark_ready(partition, indexes, fields, unit, tags, nbytes)
        self.put_meter.add(len(indexes) - len(refused), nbytes)
        self._dispatch(evicted)
        async with self.changed:
            self.changed.notify_all()
        return refused

    # ------------------------------------------------------------------ reads
    async def take(self, partition: str, consumer: str, fields: list[str], n: int, min_n: int,
                   group_size: int | None, where: dict[str, tuple[str, Any]] | None,
                   timeout: float, owner: str = "") -> Take | None:
        """Wait up to `timeout` s for enough ready rows; None if they did not come. Releases the
        owner's earlier takes first (asking for more means being done with them)."""
        self.ledger.check_take(partition, fields, where)
        self._dispatch(self.ledger.release_owner(owner))
        deadline = time.monotonic() + timeout
        last = None
        self.waiting_takes += 1
        try:
            async with self.changed:
                while True:
                    if self.ledger.generation(partition, consumer, fields) != last:
                        got = self.ledger.try_take(partition, consumer, fields, n, min_n, group_size, where,
                                                   owner, time.monotonic())
                        if got is not None:
                            self._took(partition, consumer, "take", got.indexes)
                            return got
                        last = self.ledger.generation(partition, consumer, fields)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    try:
                        await asyncio.wait_for(self.changed.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self.waiting_takes -= 1

    def _took(self, partition: str, consumer: str, op: str, indexes: list[int]) -> None:
        if op == "take":
            self.take_meter.add(len(indexes))
            self._ensure_janitor()
        if self.clog is not None and consumer in self.durable and indexes:
            self.clog.append(partition, consumer, op, indexes)

    async def discard(self, partition: str, consumer: str, where: dict[str, tuple[str, Any]] | None,
                      group_size: int | None = None, indexes: list[int] | None = None) -> list[int]:
        self.ledger.check_take(partition, [], where)
        hit, evicted = self.ledger.discard(partition, consumer, where, group_size, indexes)
        self._took(partition, consumer, "discard", hit)
        self._dispatch(evicted)
        return hit

    async def release(self, owner: str | None = None, take_id: int | None = None) -> None:
        """The consumer is done with the rows of `take_id`, or with every take of `owner`."""
        if take_id is not None:
            self._dispatch(self.ledger.release_take(take_id))
        if owner is not None:
            self._dispatch(self.ledger.release_owner(owner))

    # ------------------------------------------------------------------ leases and eviction
    def _ensure_janitor(self) -> None:
        if self.lease_added is None:
            self.lease_added = asyncio.Event()
        self.lease_added.set()
        if self.janitor is None or self.janitor.done():
            self.janitor = asyncio.get_running_loop().create_task(self._expire_leases())

    async def _expire_leases(self) -> None:
        """Sleeps until the next lease deadline (or until a lease exists), then releases what expired."""
        assert self.lease_added is not None
        while True:
            nd = self.ledger.next_deadline()
            if nd is None:
                self.lease_added.clear()
                await self.lease_added.wait()
                continue
            await asyncio.sleep(max(0.0, nd - time.monotonic()) + 0.01)
            self._dispatch(self.ledger.expire(time.monotonic()))

    def _dispatch(self, evicted: list[Evicted]) -> None:
        """Tell each unit which rows to drop (fire and forget: a dead unit has nothing left to drop)."""
        if not evicted or not self.units:
            return
        by: dict[tuple[str, int], list[int]] = defaultdict(list)
        for p, unit, idx in evicted:
            by[(p, unit)].append(idx)
        for (p, unit), idxs in by.items():
            if unit < len(self.units):
                self.units[unit].evict.remote(p, idxs)

    # ------------------------------------------------------------------ recovery
    async def restore(self, partition: str, consumed: dict[str, list[int]], evicted: IndexSet) -> int:
        """After the log's rows were replayed: who had taken what, and which rows were gone already."""
        ev = self.ledger.restore(partition, consumed, evicted)
        self._dispatch(ev)
        await await_([u.restore_evicted.remote(partition, evicted) for u in self.units], 120,
                     f"evicted rows of '{partition}' to be noted", "the data store's storage units")
        return len(ev)

    # ------------------------------------------------------------------ observability
    async def counts(self, partition: str, consumer: str | None = None) -> dict[str, Any]:
        return self.ledger.counts(partition, consumer)

    async def held(self, partition: str, consumer: str | None = None) -> list[int]:
        return self.ledger.held(partition, consumer)

    async def holders(self) -> str:
        return self.ledger.holders()

    async def stats(self) -> dict[str, Any]:
        led = self.ledger
        parts = {p: led.partition_stats(p) for p in led.parts}
        return {
            "uptime_s": time.monotonic() - self.t0,
            "rows_held": sum(s["rows"] for s in parts.values()),
            "bytes_held": sum(s["bytes"] for s in parts.values()),
            "rows_evicted": led.rows_evicted, "rows_created": led.rows_created, "puts": led.puts,
            "takes": led.takes, "rows_taken": led.rows_taken, "rows_discarded": led.rows_discarded,
            "late_writes_refused": led.refused, "leases": len(led.leases), "waiting_takes": self.waiting_takes,
            "required_consumers": list(led.required), "put": self.put_meter.snapshot(),
            "take": self.take_meter.snapshot(), "partitions": parts,
        }

    async def close(self) -> None:
        if self.clog is not None:
            self.clog.close()
