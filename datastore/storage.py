"""The store's data plane: a storage unit holds the payload of its shard of rows as Arrow record batches.

A put arrives as one record batch (an `index` column plus the fields written); the unit keeps the batch
whole and remembers, per field, where each row's value sits. A get assembles the requested fields of the
requested rows with Arrow `take`, so no value becomes a Python object on the way. Eviction forgets rows;
a batch is freed when no row of it is left and compacted when most of it is gone.

The unit also enforces its share of the store's capacity (a put of new rows waits for room) and appends
rows to the log the moment they are finished, before the controller hears they are ready, so a row a
consumer could see is always already in the log.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any, Iterable

import pyarrow as pa
import ray

from datastore.errors import StoreFull, plain
from datastore.ledger import IndexSet
from datastore.log import RowLog
from datastore.stats import RateMeter
from rl.core.waits import await_

INDEX = "index"
COMPACT_MIN_BYTES = 64 * 1024  # smaller batches are not worth copying when partly evicted


def vague(t: pa.DataType) -> bool:
    """A type Arrow inferred from values that say nothing (all None, or only empty lists: list<null>): it
    fixes no field type and casts to the field's type when read."""
    if pa.types.is_null(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return vague(t.value_type)
    return False


class Shard:
    """Payload of one unit: record batches plus a per-field index -> (batch, row) map."""

    def __init__(self) -> None:
        self.batches: dict[str, list[pa.RecordBatch | None]] = defaultdict(list)
        self.refs: dict[str, list[int]] = defaultdict(list)  # live (row, field) entries per batch
        self.full: dict[str, list[int]] = defaultdict(list)  # entries per batch when made or last compacted
        self.where: dict[str, dict[str, dict[int, tuple[int, int]]]] = defaultdict(lambda: defaultdict(dict))
        self.types: dict[str, dict[str, pa.DataType]] = defaultdict(dict)
        self.rows: dict[str, set[int]] = defaultdict(set)
        self.evicted: dict[str, IndexSet] = defaultdict(IndexSet)
        self.logged: dict[str, set[int]] = defaultdict(set)
        self.nbytes = 0

    # ------------------------------------------------------------------ checks
    def check(self, partition: str, batch: pa.RecordBatch) -> None:
        """ValueError for a write to an evicted row, TypeError for a type this shard holds otherwise."""
        gone = [i for i in batch.column(INDEX).to_pylist() if i in self.evicted[partition]]
        if gone:
            raise ValueError(f"put to rows {gone[:8]} of partition '{partition}', which every required consumer "
                             f"already took and which were evicted; a late write is refused")
        for name in batch.schema.names:
            known = self.types[partition].get(name)
            got = batch.schema.field(name).type
            if name != INDEX and known is not None and not vague(got) and known != got:
                raise TypeError(f"field '{name}' of partition '{partition}' holds {known}; this put gives {got}")

    def new_types(self, partition: str, batch: pa.RecordBatch) -> dict[str, pa.DataType]:
        known = self.types[partition]
        return {f.name: f.type for f in batch.schema if f.name != INDEX and f.name not in known
                and not vague(f.type)}

    def new_rows(self, partition: str, indexes: Iterable[int]) -> int:
        rows = self.rows[partition]
        return sum(1 for i in indexes if i not in rows)

    def num_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())

    # ------------------------------------------------------------------ writes
    def put(self, partition: str, batch: pa.RecordBatch) -> list[int]:
        for f in batch.schema:
            if f.name != INDEX and f.name not in self.types[partition] and not vague(f.type):
                self.types[partition][f.name] = f.type
        b = len(self.batches[partition])
        self.batches[partition].append(batch)
        self.nbytes += batch.nbytes
        indexes = batch.column(INDEX).to_pylist()
        names = [n for n in batch.schema.names if n != INDEX]
        self.refs[partition].append(len(indexes) * len(names))
        self.full[partition].append(len(indexes) * len(names))
        touched: set[int] = set()
        for name in names:
            col = self.where[partition][name]
            for row, idx in enumerate(indexes):
                old = col.get(idx)
                col[idx] = (b, row)
                if old is not None:
                    self.refs[partition][old[0]] -= 1
                    touched.add(old[0])
        self.rows[partition].update(indexes)
        for ob in touched:
            self._settle(partition, ob)
        return indexes

    def newly_finished(self, partition: str, indexes: list[int], fields: list[str]) -> list[int]:
        """Rows among `indexes` that now hold every one of `fields` and were not logged yet; marks them."""
        if not fields:
            return []
        where, logged = self.where[partition], self.logged[partition]
        out = [i for i in indexes if i not in logged and all(i in where.get(f, ()) for f in fields)]
        logged.update(out)
        return out

    def evict(self, partition: str, indexes: Iterable[int]) -> int:
        touched: set[int] = set()
        n = 0
        rows, refs = self.rows[partition], self.refs[partition]
        for idx in indexes:
            self.evicted[partition].add(idx)
            if idx not in rows:
                continue
            rows.discard(idx)
            self.logged[partition].discard(idx)
            n += 1
            for col in self.where[partition].values():
                loc = col.pop(idx, None)
                if loc is not None:
                    refs[loc[0]] -= 1
                    touched.add(loc[0])
        for b in touched:
            self._settle(partition, b)
        return n

    def _settle(self, partition: str, b: int) -> None:
        """Free batch `b` when nothing points into it; compact it when at most half of it is live."""
        batch = self.batches[partition][b]
        if batch is None:
            return
        live = self.refs[partition][b]
        if live <= 0:
            self.batches[partition][b] = None
            self.nbytes -= batch.nbytes
        elif live * 2 <= self.full[partition][b] and batch.nbytes >= COMPACT_MIN_BYTES:
            self._compact(partition, b, batch)

    def _compact(self, partition: str, b: int, batch: pa.RecordBatch) -> None:
        names = [n for n in batch.schema.names if n != INDEX]
        indexes = batch.column(INDEX).to_pylist()
        where = self.where[partition]
        keep = [r for r, idx in enumerate(indexes) if any(where[n].get(idx) == (b, r) for n in names)]
        small = batch.take(pa.array(keep, pa.int64()))
        for new_row, r in enumerate(keep):
            idx = indexes[r]
            for n in names:
                if where[n].get(idx) == (b, r):
                    where[n][idx] = (b, new_row)
        # a field of a kept row that was overwritten elsewhere stays in `small` but is not referenced
        self.batches[partition][b] = small
        self.nbytes += small.nbytes - batch.nbytes
        self.full[partition][b] = len(keep) * len(names)

    # ------------------------------------------------------------------ reads
    def get(self, partition: str, indexes: list[int], fields: list[str]) -> pa.Table:
        where = self.where[partition]
        batches = self.batches[partition]
        arrays = [pa.array(indexes, pa.int64())]
        for name in fields:
            if name not in where:
                raise KeyError(f"field '{name}' is not held for partition '{partition}'")
            loc = where[name]
            try:
                locs = [loc[i] for i in indexes]
            except KeyError:
                missing = [i for i in indexes if i not in loc]
                raise KeyError(f"field '{name}' of partition '{partition}' is missing for rows {missing[:8]}"
                               + (" (evicted)" if any(i in self.evicted[partition] for i in missing) else "")) from None
            arrays.append(self._gather(batches, name, locs, self.types[partition].get(name, pa.null())))
        return pa.table(arrays, names=[INDEX, *fields])

    @staticmethod
    def _gather(batches: list[pa.RecordBatch | None], name: str, locs: list[tuple[int, int]],
                typ: pa.DataType) -> pa.Array:
        """The values at `locs` in order: one Arrow take per batch touched, then one reordering take."""
        by_batch: dict[int, list[int]] = {}
        for k, (b, _) in enumerate(locs):
            by_batch.setdefault(b, []).append(k)
        pieces, order = [], []
        for b, ks in by_batch.items():
            col = batches[b].column(name)  # type: ignore[union-attr]
            piece = col.take(pa.array([locs[k][1] for k in ks], pa.int64()))
            pieces.append(piece if piece.type == typ else piece.cast(typ))
            order.extend(ks)
        if not pieces:
            return pa.array([], typ)
        if len(pieces) == 1:
            return pieces[0]
        inverse = [0] * len(order)
        for pos, k in enumerate(order):
            inverse[k] = pos
        return pa.concat_arrays(pieces).take(pa.array(inverse, pa.int64()))


# no task events: Ray's GCS would keep one per call of this actor's methods, all run long (issue 19)
@ray.remote(num_cpus=0, max_concurrency=1000, enable_task_events=False)
class StorageUnit:
    """Async actor holding one shard. `capacity_rows` / `capacity_bytes` are this unit's share (0: none)."""

    def __init__(self, unit_id: int, controller: ray.actor.ActorHandle, tag_fields: list[str],
                 finished_fields: list[str] | None = None, capacity_rows: int = 0, capacity_bytes: int = 0,
                 log_dir: str | None = None, session: str = "", log_fsync: bool = False,
                 stats_window_s: float = 30.0) -> None:
        self.unit_id, self.controller, self.tag_fields = unit_id, controller, tag_fields
        self.finished = list(finished_fields or [])
        self.cap_rows, self.cap_bytes = capacity_rows, capacity_bytes
        self.shard = Shard()
        self.log = RowLog(log_dir, unit_id, session, log_fsync) if log_dir and self.finished else None
        self.room = asyncio.Condition()
        self.waiting_puts = 0
        self.put_meter = RateMeter(stats_window_s)
        self.get_meter = RateMeter(stats_window_s)

    async def ping(self) -> int:
        return self.unit_id

    async def put(self, partition: str, batch: pa.RecordBatch, timeout: float = 300.0, replay: bool = False) -> int:
        """Store a batch and report it; `replay` (recovery) skips capacity and logging: the rows come from the log."""
        self.shard.check(partition, batch)
        new_types = self.shard.new_types(partition, batch)
        if new_types:
            canon = await self._ctl(self.controller.register_types.remote(partition, new_types), timeout,
                                    f"the types of fields {sorted(new_types)}")
            self.shard.types[partition].update(canon)
            self.shard.check(partition, batch)
        if not replay:
            await self._admit(partition, batch, timeout)
        indexes = self.shard.put(partition, batch)
        if replay:
            self.shard.logged[partition].update(indexes)
        elif self.log is not None:
            done = self.shard.newly_finished(partition, indexes, self.finished)
            if done:
                self.log.append(partition, self.shard.get(partition, done, self.finished))
        fields = [n for n in batch.schema.names if n != INDEX]
        tags = {t: batch.column(t).to_pylist() for t in self.tag_fields if t in fields}
        refused = await self._ctl(
            self.controller.mark_ready.remote(partition, indexes, fields, self.unit_id, tags, batch.nbytes), timeout,
            f"readiness of {len(indexes)} rows of '{partition}'")
        self.put_meter.add(len(indexes), batch.nbytes)
        if refused:
            self.shard.evict(partition, refused)
            raise ValueError(f"put to rows {refused[:8]} of partition '{partition}', which every required consumer "
                             f"already took and which were evicted; a late write is refused")
        return len(indexes)

    async def _ctl(self, ref: Any, timeout: float, what: str) -> Any:
        """A call to the controller, with a timeout; its own errors come out plain."""
        try:
            return await await_(ref, max(timeout, 60.0), f"the controller's answer to {what} from storage unit {self.unit_id}",
                                "the data store controller")
        except ray.exceptions.RayTaskError as exc:
            raise plain(exc) from None

    async def _admit(self, partition: str, batch: pa.RecordBatch, timeout: float) -> None:
        """Wait until the new rows of `batch` fit this unit's capacity share; StoreFull after `timeout`."""
        if not (self.cap_rows or self.cap_bytes):
            return
        indexes = batch.column(INDEX).to_pylist()
        new = self.shard.new_rows(partition, indexes)
        if not new:
            return  # writes of more fields to rows already held never wait (a consumer may need them)
        if self.cap_rows and new > self.cap_rows:
            raise ValueError(f"put of {new} new rows to storage unit {self.unit_id} can never fit its share of the "
                             f"capacity ({self.cap_rows} rows); put fewer rows at a time or raise capacity_rows")
        if self.cap_bytes and batch.nbytes > self.cap_bytes:
            raise ValueError(f"put of {batch.nbytes} bytes to storage unit {self.unit_id} can never fit its share of "
                             f"the capacity ({self.cap_bytes} bytes); put fewer rows at a time or raise capacity_bytes")
        t0 = time.monotonic()
        self.waiting_puts += 1
        try:
            async with self.room:
                while True:
                    new = self.shard.new_rows(partition, indexes)
                    if not new or self._fits(new, batch.nbytes):
                        return
                    remaining = timeout - (time.monotonic() - t0)
                    if remaining <= 0:
                        raise StoreFull(
                            f"Timed out after {time.monotonic() - t0:.1f} s waiting for room for {new} new rows "
                            f"({batch.nbytes} bytes) of partition '{partition}' on data store storage unit "
                            f"{self.unit_id}: it holds {self.shard.num_rows()} rows and {self.shard.nbytes} bytes, "
                            f"its share of the capacity is {self.cap_rows or 'unbounded'} rows and "
                            f"{self.cap_bytes or 'unbounded'} bytes")
                    try:
                        await asyncio.wait_for(self.room.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self.waiting_puts -= 1

    def _fits(self, new: int, nbytes: int) -> bool:
        return ((not self.cap_rows or self.shard.num_rows() + new <= self.cap_rows)
                and (not self.cap_bytes or self.shard.nbytes + nbytes <= self.cap_bytes))

    async def get(self, partition: str, indexes: list[int], fields: list[str]) -> pa.Table:
        table = self.shard.get(partition, indexes, fields)
        self.get_meter.add(table.num_rows, table.nbytes)
        return table

    async def evict(self, partition: str, indexes: list[int]) -> int:
        n = self.shard.evict(partition, indexes)
        async with self.room:
            self.room.notify_all()
        return n

    async def restore_evicted(self, partition: str, evicted: IndexSet) -> None:
        """Rows evicted before a restart: a late write to them is refused here too."""
        self.shard.evicted[partition].merge(evicted)

    async def nbytes(self) -> int:
        return self.shard.nbytes

    async def stats(self) -> dict[str, Any]:
        return {
            "unit": self.unit_id, "rows": self.shard.num_rows(), "bytes": self.shard.nbytes,
            "batches": sum(1 for bs in self.shard.batches.values() for b in bs if b is not None),
            "waiting_puts": self.waiting_puts, "capacity_rows": self.cap_rows, "capacity_bytes": self.cap_bytes,
            "put": self.put_meter.snapshot(), "get": self.get_meter.snapshot(),
            "log_rows": self.log.rows if self.log else 0, "log_bytes": self.log.bytes if self.log else 0,
        }

    async def close(self) -> None:
        """Finish the log's open segments (a killed unit leaves them readable too, minus a torn last batch)."""
        if self.log is not None:
            self.log.close()
