"""The data store's client: the one API producers and consumers use (picklable; pass it to any actor).

    store = DataStore.create(num_storage_units=2, tag_fields=["version"])
    store.put("train", indexes=[0, 1], columns={"response": ["a", "b"], "version": [3, 3]})
    table = store.get("trainer", "train", fields=["response"], n=8, group_size=8, timeout=30)

Rows are keyed by (partition, index); fields of a row may arrive in separate puts from separate
producers. A consumer gets each row once (per consumer name), only when every field it asks for is ready.
Payload goes producer -> storage unit -> consumer; the controller only sees metadata.
Sync methods are thin wrappers of the async ones, for callers without an event loop.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Mapping, Sequence

import pyarrow as pa
import ray

from datastore.controller import StoreController, Take
from datastore.storage import INDEX, StorageUnit
from rl.waits import WaitTimeout, await_, wait

Where = Mapping[str, tuple[str, Any]]


class DataStore:
    def __init__(self, controller: ray.actor.ActorHandle, units: list[ray.actor.ActorHandle],
                 timeout_s: float = 300.0) -> None:
        self.controller, self.units, self.timeout_s = controller, units, timeout_s

    @classmethod
    def create(cls, num_storage_units: int = 1, tag_fields: Sequence[str] = (),
               declared_fields: Sequence[str] = (), timeout_s: float = 300.0) -> "DataStore":
        """Start the controller and `num_storage_units` storage-unit actors on the current Ray cluster.

        `tag_fields`: small scalar fields (e.g. `version`) the controller keeps for `where=` filters.
        `declared_fields`: every field some producer will write; a get of any other field is an error
        at once rather than a wait that can never end.
        """
        controller = StoreController.remote(list(declared_fields))
        units = [StorageUnit.remote(i, controller, list(tag_fields)) for i in range(num_storage_units)]
        store = cls(controller, units, timeout_s)
        wait([u.nbytes.remote() for u in units] + [controller.counts.remote("_")], timeout_s,
             "data store actors to start", "the Ray cluster")
        return store

    # ------------------------------------------------------------------ put
    def _shards(self, indexes: Sequence[int], columns: Mapping[str, Sequence[Any]] | pa.Table) -> dict[int, pa.RecordBatch]:
        table = columns if isinstance(columns, pa.Table) else pa.table(dict(columns))
        if INDEX in table.column_names:
            raise ValueError(f"'{INDEX}' is reserved for the row key; pass indexes separately")
        if table.num_rows != len(indexes):
            raise ValueError(f"put of {len(indexes)} indexes with {table.num_rows} rows of fields")
        table = table.add_column(0, INDEX, pa.array(list(indexes), pa.int64()))
        by_unit: dict[int, list[int]] = defaultdict(list)
        for pos, idx in enumerate(indexes):
            by_unit[idx % len(self.units)].append(pos)
        return {u: table.take(pa.array(pos)).combine_chunks().to_batches()[0] for u, pos in by_unit.items()}

    async def aput(self, partition: str, indexes: Sequence[int],
                   columns: Mapping[str, Sequence[Any]] | pa.Table, timeout: float | None = None) -> None:
        """Write fields of rows; returns once every storage unit holds them and the controller knows."""
        refs = [self.units[u].put.remote(partition, batch) for u, batch in self._shards(indexes, columns).items()]
        await await_(refs, timeout or self.timeout_s, f"put of {len(indexes)} rows to partition '{partition}'",
                     "the data store's storage units")

    def put(self, partition: str, indexes: Sequence[int], columns: Mapping[str, Sequence[Any]] | pa.Table,
            timeout: float | None = None) -> None:
        refs = [self.units[u].put.remote(partition, batch) for u, batch in self._shards(indexes, columns).items()]
        wait(refs, timeout or self.timeout_s, f"put of {len(indexes)} rows to partition '{partition}'",
             "the data store's storage units")

    # ------------------------------------------------------------------ get
    async def atake(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int | None = None,
                    group_size: int | None = None, where: Where | None = None,
                    timeout: float | None = None) -> Take | None:
        """The metadata half of a get: claims rows for `consumer` and says where they are, or None if
        not enough were ready within `timeout`. Pair with `afetch` (e.g. one rank takes, many fetch)."""
        timeout = self.timeout_s if timeout is None else timeout
        return await self._take(consumer, partition, fields, n, min_n, group_size, where, timeout)

    async def afetch(self, partition: str, take: Take, fields: Sequence[str], timeout: float | None = None) -> pa.Table:
        """The payload half of a get: the rows of `take`, in its order, straight from the storage units."""
        return await self._fetch(partition, take, fields, self.timeout_s if timeout is None else timeout)

    def take(self, consumer: str, partition: str, fields: Sequence[str], n: int, **kw: Any) -> Take | None:
        return _run(self.atake(consumer, partition, fields, n, **kw))

    def fetch(self, partition: str, take: Take, fields: Sequence[str], timeout: float | None = None) -> pa.Table:
        return _run(self.afetch(partition, take, fields, timeout))

    async def _fetch(self, partition: str, take: Take, fields: Sequence[str], timeout: float) -> pa.Table:
        by_unit: dict[int, list[int]] = defaultdict(list)
        for idx, unit in zip(take.indexes, take.units):
            by_unit[unit].append(idx)
        refs = [self.units[u].get.remote(partition, idxs, list(fields)) for u, idxs in by_unit.items()]
        parts = await await_(refs, timeout, f"payload of {len(take.indexes)} rows", "the data store's storage units")
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        order = {idx: k for k, idx in enumerate(take.indexes)}
        return table.take(pa.array(sorted(range(table.num_rows), key=lambda r: order[table.column(INDEX)[r].as_py()])))

    async def aget(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int | None = None,
                   group_size: int | None = None, where: Where | None = None,
                   timeout: float | None = None) -> pa.Table:
        """Up to `n` rows (at least `min_n`, default `n`) whose `fields` are all ready and that `consumer`
        has not had; whole groups of `group_size` rows (indexes g*size .. g*size+size-1) when given.
        Waits up to `timeout` s; raises WaitTimeout naming what it waited for."""
        timeout = self.timeout_s if timeout is None else timeout
        got = await self._take(consumer, partition, fields, n, min_n, group_size, where, timeout)
        if got is None:
            counts = await await_(self.controller.counts.remote(partition, consumer), 30, "row counts",
                                  "the data store controller")
            raise WaitTimeout(
                f"Timed out after {timeout:.1f} s waiting for {min_n or n} rows of fields {list(fields)} "
                f"in partition '{partition}' for consumer '{consumer}'"
                + (f" in whole groups of {group_size}" if group_size else "")
                + (f" where {dict(where)}" if where else "")
                + f" from the data store; it holds {counts['rows']} rows, ready per field {counts['ready']}, "
                f"{counts.get('untaken', 0)} not yet taken by '{consumer}'"
            )
        return await self._fetch(partition, got, fields, timeout)

    async def apoll(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int = 1,
                    group_size: int | None = None, where: Where | None = None) -> pa.Table | None:
        """Non-blocking: what is ready now (at least `min_n` rows), or None."""
        got = await self._take(consumer, partition, fields, n, min_n, group_size, where, 0.0)
        return None if got is None else await self._fetch(partition, got, fields, self.timeout_s)

    async def _take(self, consumer, partition, fields, n, min_n, group_size, where, timeout) -> Take | None:
        if group_size and n % group_size:
            raise ValueError(f"n={n} must be a multiple of group_size={group_size}")
        return await await_(
            self.controller.take.remote(partition, consumer, list(fields), n, min_n or n, group_size,
                                        dict(where) if where else None, timeout),
            timeout + 60, f"a take of rows for consumer '{consumer}'", "the data store controller")

    def get(self, consumer: str, partition: str, fields: Sequence[str], n: int, **kw: Any) -> pa.Table:
        return _run(self.aget(consumer, partition, fields, n, **kw))

    def poll(self, consumer: str, partition: str, fields: Sequence[str], n: int, **kw: Any) -> pa.Table | None:
        return _run(self.apoll(consumer, partition, fields, n, **kw))

    def discard(self, consumer: str, partition: str, where: Where, group_size: int | None = None) -> list[int]:
        """Rows matching `where` (whole groups when `group_size`) count as taken by `consumer` without
        being delivered; returns their indexes. Used to drop samples past the staleness bound."""
        return wait(self.controller.discard.remote(partition, consumer, dict(where), group_size), self.timeout_s,
                    f"discard of rows for consumer '{consumer}'", "the data store controller")

    # ------------------------------------------------------------------ observability
    def counts(self, partition: str, consumer: str | None = None) -> dict[str, Any]:
        return wait(self.controller.counts.remote(partition, consumer), 30, "row counts", "the data store controller")

    def stats(self) -> dict[str, Any]:
        out = wait(self.controller.stats.remote(), 30, "statistics", "the data store controller")
        out["bytes_held"] = sum(wait([u.nbytes.remote() for u in self.units], 30, "byte counts", "storage units"))
        return out

    def shutdown(self) -> None:
        for actor in [self.controller, *self.units]:
            ray.kill(actor)


def _run(coro: Any) -> Any:
    """Run a coroutine from sync code (no event loop running in this thread)."""
    return asyncio.run(coro)
