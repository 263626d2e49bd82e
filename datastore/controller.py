"""The store's control plane: which fields of which rows are ready, and which consumer took which rows.

It holds metadata only (a few bytes a row); payloads live in storage units and go straight from a unit to
its consumer. Bookkeeping is a plain class (`Ledger`) so it is unit-tested without Ray; `StoreController`
is the async Ray actor around it, where a waiting consumer awaits a condition instead of polling.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import ray

OPS = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


@dataclass
class RowMeta:
    unit: int
    fields: set[str] = field(default_factory=set)
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass
class Take:
    """What a consumer got: row indexes in order and the storage unit holding each."""

    indexes: list[int]
    units: list[int]


class Ledger:
    """Metadata of every row held: readiness per field, small tag values, and consumption per consumer."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, RowMeta]] = defaultdict(dict)
        self.consumed: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        self.known_fields: dict[str, set[str]] = defaultdict(set)
        self.puts = 0
        self.rows_taken = 0

    def mark_ready(self, partition: str, indexes: list[int], fields: list[str], unit: int,
                   tags: dict[str, list[Any]]) -> None:
        rows = self.rows[partition]
        for k, idx in enumerate(indexes):
            meta = rows.get(idx)
            if meta is None:
                meta = rows[idx] = RowMeta(unit=unit)
            meta.fields.update(fields)
            for tag, values in tags.items():
                meta.tags[tag] = values[k]
        self.known_fields[partition].update(fields)
        self.puts += 1

    def _eligible(self, partition: str, consumer: str, fields: list[str],
                  where: dict[str, tuple[str, Any]] | None) -> list[int]:
        taken = self.consumed[partition][consumer]
        need = set(fields)
        out = []
        for idx, meta in self.rows[partition].items():
            if idx in taken or not need <= meta.fields:
                continue
            if where and not all(t in meta.tags and OPS[op](meta.tags[t], v) for t, (op, v) in where.items()):
                continue
            out.append(idx)
        out.sort()
        return out

    def try_take(self, partition: str, consumer: str, fields: list[str], n: int, min_n: int,
                 group_size: int | None, where: dict[str, tuple[str, Any]] | None) -> Take | None:
        """Up to `n` eligible rows (whole groups when `group_size`), oldest first, if at least `min_n`."""
        eligible = self._eligible(partition, consumer, fields, where)
        if group_size:
            by_group: dict[int, list[int]] = defaultdict(list)
            for idx in eligible:
                by_group[idx // group_size].append(idx)
            picked: list[int] = []
            for g in sorted(by_group):
                if len(by_group[g]) == group_size and len(picked) + group_size <= n:
                    picked.extend(by_group[g])
        else:
            picked = eligible[:n]
        if len(picked) < max(min_n, 1):
            return None
        self.consumed[partition][consumer].update(picked)
        self.rows_taken += len(picked)
        rows = self.rows[partition]
        return Take(indexes=picked, units=[rows[i].unit for i in picked])

    def discard(self, partition: str, consumer: str, where: dict[str, tuple[str, Any]],
                group_size: int | None = None) -> list[int]:
        """Mark as taken by `consumer`, without delivering them, the rows matching `where` (and the rest
        of their groups when `group_size`); returns those indexes. For samples too stale to train on."""
        taken = self.consumed[partition][consumer]
        hit = [i for i, m in self.rows[partition].items() if i not in taken
               and all(t in m.tags and OPS[op](m.tags[t], v) for t, (op, v) in where.items())]
        if group_size:
            groups = {i // group_size for i in hit}
            hit = [i for i in self.rows[partition] if i // group_size in groups and i not in taken]
        taken.update(hit)
        return sorted(hit)

    def counts(self, partition: str, consumer: str | None = None) -> dict[str, Any]:
        """Rows held, ready count per field, and rows not yet taken by `consumer`."""
        rows = self.rows.get(partition, {})
        ready: dict[str, int] = defaultdict(int)
        for meta in rows.values():
            for f in meta.fields:
                ready[f] += 1
        out: dict[str, Any] = {"rows": len(rows), "ready": dict(ready)}
        if consumer is not None:
            out["untaken"] = len(rows) - len(self.consumed[partition][consumer] & rows.keys())
        return out

    def check_fields(self, partition: str, fields: list[str], declared: set[str]) -> None:
        unknown = [f for f in fields if f not in declared and f not in self.known_fields[partition]]
        if unknown and declared:
            raise KeyError(
                f"get of field(s) {unknown} in partition '{partition}': no producer writes them; "
                f"known fields: {sorted(declared | self.known_fields[partition])}"
            )


@ray.remote(num_cpus=0, max_concurrency=1000)
class StoreController:
    """Async actor: producers' units report readiness; consumers wait here for ready rows."""

    def __init__(self, declared_fields: list[str] | None = None) -> None:
        self.ledger = Ledger()
        self.declared = set(declared_fields or [])
        self.changed = asyncio.Condition()
        self.t0 = time.monotonic()

    async def mark_ready(self, partition: str, indexes: list[int], fields: list[str], unit: int,
                         tags: dict[str, list[Any]]) -> None:
        self.ledger.mark_ready(partition, indexes, fields, unit, tags)
        async with self.changed:
            self.changed.notify_all()

    async def take(self, partition: str, consumer: str, fields: list[str], n: int, min_n: int,
                   group_size: int | None, where: dict[str, tuple[str, Any]] | None,
                   timeout: float) -> Take | None:
        """Wait up to `timeout` s for enough ready rows; None if they did not come."""
        self.ledger.check_fields(partition, fields, self.declared)
        deadline = time.monotonic() + timeout
        async with self.changed:
            while True:
                got = self.ledger.try_take(partition, consumer, fields, n, min_n, group_size, where)
                remaining = deadline - time.monotonic()
                if got is not None or remaining <= 0:
                    return got
                try:
                    await asyncio.wait_for(self.changed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass

    async def discard(self, partition: str, consumer: str, where: dict[str, tuple[str, Any]],
                      group_size: int | None = None) -> list[int]:
        return self.ledger.discard(partition, consumer, where, group_size)

    async def counts(self, partition: str, consumer: str | None = None) -> dict[str, Any]:
        return self.ledger.counts(partition, consumer)

    async def stats(self) -> dict[str, Any]:
        return {
            "puts": self.ledger.puts,
            "rows_taken": self.ledger.rows_taken,
            "partitions": {p: self.ledger.counts(p) for p in self.ledger.rows},
            "uptime_s": time.monotonic() - self.t0,
        }
