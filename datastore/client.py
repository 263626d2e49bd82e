"""The data store's client: the one API producers and consumers use (picklable; pass it to any actor).

    store = DataStore.create(num_storage_units=2, tag_fields=["version"], declared_fields=[...],
                             required_consumers=["reward", "trainer"], capacity_rows=4096, log_dir=run_dir / "datastore")
    store.put("train", indexes=[0, 1], columns={"response": ["a", "b"], "version": [3, 3]})
    table = store.get("trainer", "train", fields=["response"], n=8, group_size=8, timeout=30)

Rows are keyed by (partition, index); fields of a row may arrive in separate puts from separate
producers. A consumer gets each row once (per consumer name), only when every field it asks for is ready.
Payload goes producer -> storage unit -> consumer; the controller only sees metadata. Every method has an
async twin (`aput`, `atake`, ...) for actors that run an event loop; the sync ones call Ray directly.
Semantics, capacity, eviction and the log are described in docs/datastore.md.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pyarrow as pa
import ray

from datastore import log as dlog
from datastore.controller import StoreController
from datastore.errors import RECOVERY_HINT, StoreFull, translated
from datastore.ledger import Take, check_where
from datastore.stats import merge
from datastore.storage import INDEX, StorageUnit
from rl.core.waits import WaitTimeout, await_, wait

if TYPE_CHECKING:
    from rl.core.config import DataStoreConfig

Where = Mapping[str, tuple[str, Any]]
Columns = Mapping[str, Sequence[Any]] | pa.Table
MARGIN_S = 30.0  # an actor call that itself waits `timeout` gets this much longer before we give up on it
CONTROLLER = "the data store controller"
_PARTITION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PROCESS = uuid.uuid4().hex[:12]


def owner_token(consumer: str) -> str:
    """Who holds a take: this consumer name in this process, thread and asyncio task. The owner's next
    take releases its earlier ones (see Ledger), so two tasks sharing a consumer name never release
    each other's rows."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return f"{consumer}@{_PROCESS}:{threading.get_ident()}:{id(task) if task is not None else 0}"


class DataStore:
    def __init__(self, controller: ray.actor.ActorHandle, units: list[ray.actor.ActorHandle],
                 timeout_s: float = 300.0, *, tag_fields: Sequence[str] = (), declared_fields: Sequence[str] = (),
                 settings: dict[str, Any] | None = None) -> None:
        self.controller, self.units, self.timeout_s = controller, units, timeout_s
        self.tag_fields = list(tag_fields)
        self.declared = list(declared_fields)
        self.settings = dict(settings or {})
        self.recovered: dict[str, Any] = {}  # what create() read back from an existing log, per partition

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, num_storage_units: int = 1, tag_fields: Sequence[str] = (),
               declared_fields: Sequence[str] = (), timeout_s: float = 300.0, *,
               required_consumers: Sequence[str] = (), finished_fields: Sequence[str] | None = None,
               durable_consumers: Sequence[str] | None = None, capacity_rows: int = 0, capacity_bytes: int = 0,
               log_dir: str | Path | None = None, log_fsync: bool = False, lease_s: float = 600.0,
               stats_window_s: float = 30.0) -> "DataStore":
        """Start the controller and `num_storage_units` storage-unit actors on the current Ray cluster.

        `tag_fields`: small scalar fields (e.g. `version`) the controller keeps for `where=` filters.
        `declared_fields`: every field some producer will write; a put or get of any other field is an
        error at once rather than a wait that can never end.
        `required_consumers`: a row taken or discarded by all of these (and finished) is dropped from memory.
        `finished_fields`: the fields that make a row finished (default: every declared field).
        `capacity_rows` / `capacity_bytes`: bound on what is held (0: none), split evenly over the units;
        a put of new rows waits for room up to its timeout, then raises StoreFull.
        `log_dir`: append finished rows and durable consumers' takes there; if it holds a log already,
        its rows are read back first (rows every required consumer had taken stay evicted).
        `durable_consumers`: consumers whose takes are logged (default: the required consumers).
        `lease_s`: a take's rows stay in memory until the taker takes again, releases, or this passes.
        """
        finished = list(declared_fields) if finished_fields is None else list(finished_fields)
        _check_create(num_storage_units, capacity_rows, capacity_bytes, log_dir, finished, declared_fields,
                      required_consumers, lease_s)
        log_dir = str(Path(log_dir).expanduser()) if log_dir else None
        session = dlog.session_id()
        controller = StoreController.remote(
            list(declared_fields), list(tag_fields), list(required_consumers), finished,
            None if durable_consumers is None else list(durable_consumers), log_dir, log_fsync, lease_s,
            stats_window_s)
        share_rows = math.ceil(capacity_rows / num_storage_units) if capacity_rows else 0
        share_bytes = math.ceil(capacity_bytes / num_storage_units) if capacity_bytes else 0
        units = [StorageUnit.remote(i, controller, list(tag_fields), finished, share_rows, share_bytes, log_dir,
                                    session, log_fsync, stats_window_s) for i in range(num_storage_units)]
        settings = {"num_storage_units": num_storage_units, "capacity_rows": capacity_rows,
                    "capacity_bytes": capacity_bytes, "required_consumers": list(required_consumers),
                    "finished_fields": finished, "log_dir": log_dir, "session": session}
        store = cls(controller, units, timeout_s, tag_fields=tag_fields, declared_fields=declared_fields,
                    settings=settings)
        with translated("a data store actor"):
            wait([u.ping.remote() for u in units] + [controller.set_units.remote(units)], timeout_s,
                 "data store actors to start", "the Ray cluster")
        if log_dir:
            from datastore.recovery import replay

            store.recovered = replay(store, log_dir, list(required_consumers))
            wait(controller.open_log.remote(), timeout_s, "the consumption log to open", CONTROLLER)
            dlog.write_meta(log_dir, {**settings, "declared_fields": list(declared_fields),
                                      "tag_fields": list(tag_fields), "created": time.time()})
        return store

    @classmethod
    def from_config(cls, cfg: "DataStoreConfig", *, tag_fields: Sequence[str] = (),
                    declared_fields: Sequence[str] = (), timeout_s: float = 300.0,
                    run_dir: str | Path | None = None) -> "DataStore":
        """`create` with the recipe's `datastore` section; the log goes to <run_dir>/datastore when
        `cfg.log` and a run directory is given."""
        return cls.create(
            cfg.num_storage_units, tag_fields, declared_fields, timeout_s,
            required_consumers=list(cfg.required_consumers),
            finished_fields=list(cfg.finished_fields) or None,
            durable_consumers=list(cfg.durable_consumers) or None,
            capacity_rows=cfg.capacity_rows, capacity_bytes=cfg.capacity_bytes,
            log_dir=Path(run_dir) / "datastore" if (cfg.log and run_dir) else None,
            log_fsync=cfg.log_fsync, lease_s=cfg.lease_s, stats_window_s=cfg.stats_window_s)

    # ------------------------------------------------------------------ put
    def _shards(self, partition: str, indexes: Sequence[int], columns: Columns,
                replay: bool = False) -> dict[int, pa.RecordBatch]:
        _check_partition(partition)
        table = columns if isinstance(columns, pa.Table) else _table(columns)
        if INDEX in table.column_names:
            raise ValueError(f"'{INDEX}' is reserved for the row key; pass indexes separately")
        if table.num_columns == 0:
            raise ValueError(f"put to partition '{partition}' with no fields")
        if table.num_rows != len(indexes):
            raise ValueError(f"put of {len(indexes)} indexes with {table.num_rows} rows of fields")
        if self.declared and not replay:  # a log written before a field was dropped still replays
            unknown = [f for f in table.column_names if f not in self.declared]
            if unknown:
                raise KeyError(f"put of field(s) {unknown} to partition '{partition}': not declared; declared "
                               f"fields: {self.declared} (DataStore.create(declared_fields=...))")
        idx = _check_indexes(indexes)
        table = table.add_column(0, INDEX, pa.array(idx, pa.int64()))
        if len(self.units) == 1:
            return {0: table.combine_chunks().to_batches()[0]} if idx else {}
        by_unit: dict[int, list[int]] = defaultdict(list)
        for pos, i in enumerate(idx):
            by_unit[i % len(self.units)].append(pos)
        return {u: table.take(pa.array(pos)).combine_chunks().to_batches()[0] for u, pos in by_unit.items()}

    def _submit_put(self, partition: str, indexes: Sequence[int], columns: Columns, timeout: float,
                    replay: bool = False) -> list[tuple[int, Any]]:
        return [(u, self.units[u].put.remote(partition, batch, timeout, replay))
                for u, batch in self._shards(partition, indexes, columns, replay).items()]

    def put(self, partition: str, indexes: Sequence[int], columns: Columns, timeout: float | None = None) -> None:
        """Write fields of rows; returns once every storage unit holds them and the controller knows.
        A put of rows the store does not hold yet waits up to `timeout` for room (StoreFull after it)."""
        timeout = self._t(timeout)
        refs = self._submit_put(partition, indexes, columns, timeout)
        try:
            self._wait_units(refs, timeout + MARGIN_S, f"put of {len(indexes)} rows to partition '{partition}'")
        except StoreFull as exc:
            raise StoreFull(f"{exc}. What holds the store: {self._ctl(self.controller.holders.remote(), 30, 'holders')}") from None

    async def aput(self, partition: str, indexes: Sequence[int], columns: Columns,
                   timeout: float | None = None) -> None:
        timeout = self._t(timeout)
        refs = self._submit_put(partition, indexes, columns, timeout)
        try:
            await self._await_units(refs, timeout + MARGIN_S, f"put of {len(indexes)} rows to partition '{partition}'")
        except StoreFull as exc:
            holders = await self._actl(self.controller.holders.remote(), 30, "holders")
            raise StoreFull(f"{exc}. What holds the store: {holders}") from None

    # ------------------------------------------------------------------ take / fetch
    def _take_ref(self, consumer: str, partition: str, fields: Sequence[str], n: int, min_n: int | None,
                  group_size: int | None, where: Where | None, timeout: float) -> Any:
        _check_partition(partition)
        fields = _check_fields(fields)
        if not isinstance(consumer, str) or not consumer:
            raise TypeError(f"consumer must be a non-empty name; got {consumer!r}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int; got {n!r}")
        if min_n is not None and not 1 <= min_n <= n:
            raise ValueError(f"min_n={min_n} must be in [1, n={n}]")
        if group_size is not None and (group_size < 1 or n % group_size):
            raise ValueError(f"n={n} must be a multiple of group_size={group_size}")
        check_where(where, self.tag_fields or None)
        return self.controller.take.remote(partition, consumer, fields, n, min_n or n, group_size,
                                           dict(where) if where else None, timeout, owner_token(consumer))

    def take(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int | None = None,
             group_size: int | None = None, where: Where | None = None, timeout: float | None = None) -> Take | None:
        """The metadata half of a get: claims rows for `consumer` and says where they are, or None if
        not enough were ready within `timeout`. Pair with `fetch` (e.g. one rank takes, many fetch).
        The rows stay in memory until this thread/task takes again for `consumer` (or `release`s)."""
        timeout = self._t(timeout)
        ref = self._take_ref(consumer, partition, fields, n, min_n, group_size, where, timeout)
        return self._ctl(ref, timeout + MARGIN_S, f"a take of rows for consumer '{consumer}'")

    async def atake(self, consumer: str, partition: str, fields: Sequence[str], n: int, *,
                    min_n: int | None = None, group_size: int | None = None, where: Where | None = None,
                    timeout: float | None = None) -> Take | None:
        timeout = self._t(timeout)
        ref = self._take_ref(consumer, partition, fields, n, min_n, group_size, where, timeout)
        return await self._actl(ref, timeout + MARGIN_S, f"a take of rows for consumer '{consumer}'")

    def _fetch_refs(self, partition: str, take: Take, fields: Sequence[str]) -> list[tuple[int, Any]]:
        fields = _check_fields(fields)
        by_unit: dict[int, list[int]] = defaultdict(list)
        for idx, unit in zip(take.indexes, take.units):
            by_unit[unit].append(idx)
        return [(u, self.units[u].get.remote(partition, idxs, fields)) for u, idxs in by_unit.items()]

    def fetch(self, partition: str, take: Take, fields: Sequence[str], timeout: float | None = None) -> pa.Table:
        """The payload half of a get: the rows of `take`, in its order, straight from the storage units."""
        refs = self._fetch_refs(partition, take, fields)
        parts = self._wait_units(refs, self._t(timeout), f"payload of {len(take.indexes)} rows of '{partition}'")
        return _assemble(take, parts, fields)

    async def afetch(self, partition: str, take: Take, fields: Sequence[str], timeout: float | None = None) -> pa.Table:
        refs = self._fetch_refs(partition, take, fields)
        parts = await self._await_units(refs, self._t(timeout), f"payload of {len(take.indexes)} rows of '{partition}'")
        return _assemble(take, parts, fields)

    # ------------------------------------------------------------------ get / poll (take + fetch + release)
    def get(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int | None = None,
            group_size: int | None = None, where: Where | None = None, timeout: float | None = None) -> pa.Table:
        """Up to `n` rows (at least `min_n`, default `n`) whose `fields` are all ready and that `consumer`
        has not had; whole groups of `group_size` rows (indexes g*size .. g*size+size-1) when given.
        Waits up to `timeout` s; raises WaitTimeout naming what it waited for."""
        timeout = self._t(timeout)
        got = self.take(consumer, partition, fields, n, min_n=min_n, group_size=group_size, where=where,
                        timeout=timeout)
        if got is None:
            counts = self._ctl(self.controller.counts.remote(partition, consumer), 30, "row counts")
            raise WaitTimeout(_get_timeout_msg(consumer, partition, fields, min_n or n, group_size, where, timeout, counts))
        try:
            return self.fetch(partition, got, fields, timeout)
        finally:
            self.controller.release.remote(take_id=got.take_id)

    async def aget(self, consumer: str, partition: str, fields: Sequence[str], n: int, *,
                   min_n: int | None = None, group_size: int | None = None, where: Where | None = None,
                   timeout: float | None = None) -> pa.Table:
        timeout = self._t(timeout)
        got = await self.atake(consumer, partition, fields, n, min_n=min_n, group_size=group_size, where=where,
                               timeout=timeout)
        if got is None:
            counts = await self._actl(self.controller.counts.remote(partition, consumer), 30, "row counts")
            raise WaitTimeout(_get_timeout_msg(consumer, partition, fields, min_n or n, group_size, where, timeout, counts))
        try:
            return await self.afetch(partition, got, fields, timeout)
        finally:
            self.controller.release.remote(take_id=got.take_id)

    def poll(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int = 1,
             group_size: int | None = None, where: Where | None = None) -> pa.Table | None:
        """Non-blocking: what is ready now (at least `min_n` rows), or None."""
        got = self.take(consumer, partition, fields, n, min_n=min_n, group_size=group_size, where=where, timeout=0.0)
        if got is None:
            return None
        try:
            return self.fetch(partition, got, fields)
        finally:
            self.controller.release.remote(take_id=got.take_id)

    async def apoll(self, consumer: str, partition: str, fields: Sequence[str], n: int, *, min_n: int = 1,
                    group_size: int | None = None, where: Where | None = None) -> pa.Table | None:
        got = await self.atake(consumer, partition, fields, n, min_n=min_n, group_size=group_size, where=where,
                               timeout=0.0)
        if got is None:
            return None
        try:
            return await self.afetch(partition, got, fields)
        finally:
            self.controller.release.remote(take_id=got.take_id)

    # ------------------------------------------------------------------ discard / release
    def discard(self, consumer: str, partition: str, where: Where | None, group_size: int | None = None, *,
                indexes: Sequence[int] | None = None) -> list[int]:
        """Held rows matching `where` (among `indexes` when given; whole groups when `group_size`) count
        as taken by `consumer` without being delivered; returns their indexes. Used to drop samples past
        the staleness bound, or (with `indexes`) groups that can never complete after a recovery."""
        return self._ctl(self._discard_ref(consumer, partition, where, group_size, indexes), self.timeout_s,
                         f"discard of rows for consumer '{consumer}'")

    async def adiscard(self, consumer: str, partition: str, where: Where | None, group_size: int | None = None, *,
                       indexes: Sequence[int] | None = None) -> list[int]:
        return await self._actl(self._discard_ref(consumer, partition, where, group_size, indexes), self.timeout_s,
                                f"discard of rows for consumer '{consumer}'")

    def _discard_ref(self, consumer: str, partition: str, where: Where | None, group_size: int | None,
                     indexes: Sequence[int] | None) -> Any:
        check_where(where, self.tag_fields or None)
        return self.controller.discard.remote(partition, consumer, dict(where) if where else None, group_size,
                                              None if indexes is None else [int(i) for i in indexes])

    def held(self, partition: str, consumer: str | None = None) -> list[int]:
        """Indexes of the rows the store holds (those not yet taken by `consumer`, when given)."""
        return self._ctl(self.controller.held.remote(partition, consumer), 30, "held row indexes")

    def release(self, consumer: str, take: Take | None = None) -> None:
        """Done with the rows of `take` (or of every take this thread/task made for `consumer`): they may
        be evicted once every required consumer is done. A later take does the same implicitly."""
        ref = (self.controller.release.remote(take_id=take.take_id) if take is not None and take.take_id >= 0
               else self.controller.release.remote(owner=owner_token(consumer)))
        self._ctl(ref, 30, f"release of rows by '{consumer}'")

    async def arelease(self, consumer: str, take: Take | None = None) -> None:
        ref = (self.controller.release.remote(take_id=take.take_id) if take is not None and take.take_id >= 0
               else self.controller.release.remote(owner=owner_token(consumer)))
        await self._actl(ref, 30, f"release of rows by '{consumer}'")

    # ------------------------------------------------------------------ observability
    def counts(self, partition: str, consumer: str | None = None) -> dict[str, Any]:
        return self._ctl(self.controller.counts.remote(partition, consumer), 30, "row counts")

    def stats(self) -> dict[str, Any]:
        """Queue depths per consumer, ready/unready per field, rows and bytes held, put/get rates (since
        start and over the recent window), evictions, waiting puts/takes, and each unit's health."""
        ctl = self._ctl(self.controller.stats.remote(), 30, "statistics")
        units = []
        for u, unit in enumerate(self.units):
            try:
                with translated(self._unit_name(u)):
                    units.append({"alive": True, **wait(unit.stats.remote(), 10, "statistics", self._unit_name(u))})
            except Exception as exc:  # a dead or hung unit is reported, not raised: stats feed a dashboard
                units.append({"unit": u, "alive": False, "error": str(exc)[:300]})
        return _compose_stats(ctl, units, self.settings)

    async def astats(self) -> dict[str, Any]:
        ctl = await self._actl(self.controller.stats.remote(), 30, "statistics")
        units = []
        for u, unit in enumerate(self.units):
            try:
                with translated(self._unit_name(u)):
                    units.append({"alive": True, **await await_(unit.stats.remote(), 10, "statistics", self._unit_name(u))})
            except Exception as exc:
                units.append({"unit": u, "alive": False, "error": str(exc)[:300]})
        return _compose_stats(ctl, units, self.settings)

    def metrics(self, stats: dict[str, Any] | None = None) -> dict[str, float]:
        """`stats()` flattened to `datastore/...` floats for the metrics stream (MetricsLogger.log)."""
        return flatten_stats(self.stats() if stats is None else stats)

    def health(self) -> dict[str, bool]:
        """Which store actors answer a ping within 10 s."""
        out = {}
        for name, actor in [("controller", self.controller)] + [(f"unit{u}", a) for u, a in enumerate(self.units)]:
            try:
                ray.get(actor.ping.remote(), timeout=10)
                out[name] = True
            except Exception:
                out[name] = False
        return out

    def shutdown(self, timeout: float = 30.0) -> None:
        """Close the log files cleanly (best effort), then kill the store's actors."""
        actors = [self.controller, *self.units]
        try:
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=timeout)
        except Exception:
            pass
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:
                pass

    # ------------------------------------------------------------------ waiting, with errors that say who
    def _t(self, timeout: float | None) -> float:
        return self.timeout_s if timeout is None else float(timeout)

    def _unit_name(self, u: int) -> str:
        return f"data store storage unit {u} (of {len(self.units)})"

    def _ctl(self, ref: Any, timeout: float, what: str) -> Any:
        with translated(CONTROLLER):
            return wait(ref, timeout, what, CONTROLLER)

    async def _actl(self, ref: Any, timeout: float, what: str) -> Any:
        with translated(CONTROLLER):
            return await await_(ref, timeout, what, CONTROLLER)

    def _wait_units(self, refs: list[tuple[int, Any]], timeout: float, what: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        out = []
        for u, ref in refs:
            whom = self._unit_name(u)
            with translated(whom, RECOVERY_HINT):
                out.append(wait(ref, max(0.0, deadline - time.monotonic()), what, whom))
        return out

    async def _await_units(self, refs: list[tuple[int, Any]], timeout: float, what: str) -> list[Any]:
        async def one(u: int, ref: Any) -> Any:
            whom = self._unit_name(u)
            with translated(whom, RECOVERY_HINT):
                return await await_(ref, timeout, what, whom)

        results = await asyncio.gather(*(one(u, r) for u, r in refs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)


# ---------------------------------------------------------------------- helpers
def _check_create(num_units: int, cap_rows: int, cap_bytes: int, log_dir: Any, finished: list[str],
                  declared: Sequence[str], required: Sequence[str], lease_s: float) -> None:
    if not isinstance(num_units, int) or num_units < 1:
        raise ValueError(f"num_storage_units must be an int >= 1 (datastore.num_storage_units); got {num_units!r}")
    for name, v in [("capacity_rows", cap_rows), ("capacity_bytes", cap_bytes)]:
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0 (0: unbounded; datastore.{name}); got {v!r}")
    if log_dir and not finished:
        raise ValueError("a log_dir needs the fields that make a row finished: pass declared_fields (or finished_fields)")
    if declared:
        unknown = [f for f in finished if f not in declared]
        if unknown:
            raise KeyError(f"finished_fields {unknown} are not declared; declared fields: {list(declared)}")
    if isinstance(required, str):
        raise TypeError(f"required_consumers must be a list of names; got the string {required!r}")
    if lease_s <= 0:
        raise ValueError(f"lease_s must be > 0 (datastore.lease_s); got {lease_s!r}")


def _check_partition(partition: str) -> None:
    if not isinstance(partition, str) or not _PARTITION.match(partition):
        raise ValueError(f"partition must be a name of letters, digits, '_', '.', '-'; got {partition!r}")


def _check_fields(fields: Sequence[str]) -> list[str]:
    if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
        raise TypeError(f"fields must be a list of field names; got {fields!r}")
    if not fields:
        raise ValueError("fields must name at least one field")
    return list(fields)


def _check_indexes(indexes: Sequence[int]) -> list[int]:
    idx = [int(i) for i in indexes]
    if any(i < 0 for i in idx) or any(i != j for i, j in zip(idx, indexes)):
        raise ValueError(f"row indexes must be non-negative ints; got {list(indexes)[:8]}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"a put names the same row twice: {sorted({i for i in idx if idx.count(i) > 1})[:8]}")
    return idx


def _table(columns: Mapping[str, Sequence[Any]]) -> pa.Table:
    try:
        return pa.table(dict(columns))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise TypeError(f"put columns cannot be made into Arrow arrays (mixed or unsupported types?): {exc}") from None


def _assemble(take: Take, parts: list[pa.Table], fields: Sequence[str]) -> pa.Table:
    """The units' answers, as one table in the take's order."""
    if not parts:
        return pa.table({INDEX: pa.array([], pa.int64()), **{f: pa.array([]) for f in fields}})
    if len(parts) == 1:
        return parts[0]  # a unit answers in the order asked, which is the take's order
    table = pa.concat_tables(parts)
    pos = {i: k for k, i in enumerate(table.column(INDEX).to_pylist())}
    return table.take(pa.array([pos[i] for i in take.indexes], pa.int64()))


def _get_timeout_msg(consumer: str, partition: str, fields: Sequence[str], n: int, group_size: int | None,
                     where: Where | None, timeout: float, counts: dict[str, Any]) -> str:
    return (f"Timed out after {timeout:.1f} s waiting for {n} rows of fields {list(fields)} "
            f"in partition '{partition}' for consumer '{consumer}'"
            + (f" in whole groups of {group_size}" if group_size else "")
            + (f" where {dict(where)}" if where else "")
            + f" from the data store; it holds {counts['rows']} rows, ready per field {counts['ready']}, "
            f"{counts.get('untaken', 0)} not yet taken by '{consumer}'")


def _compose_stats(ctl: dict[str, Any], units: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    alive = [u for u in units if u.get("alive")]
    out = dict(ctl)
    out.update({
        "capacity_rows": settings.get("capacity_rows", 0), "capacity_bytes": settings.get("capacity_bytes", 0),
        "unit_bytes_held": sum(u["bytes"] for u in alive), "waiting_puts": sum(u["waiting_puts"] for u in alive),
        "put_payload": merge([u["put"] for u in alive]), "get": merge([u["get"] for u in alive]),
        "log": {"dir": settings.get("log_dir"), "rows": sum(u["log_rows"] for u in alive),
                "bytes": sum(u["log_bytes"] for u in alive)},
        "dead_units": [u["unit"] for u in units if not u.get("alive")], "units": units,
    })
    return out


def flatten_stats(s: dict[str, Any]) -> dict[str, float]:
    """The figures of `stats()` a dashboard plots, as flat `datastore/...` keys."""
    mb = 1 / 2**20
    out = {
        "datastore/rows_held": s["rows_held"], "datastore/bytes_held": s["bytes_held"],
        "datastore/unit_bytes_held": s["unit_bytes_held"], "datastore/rows_evicted": s["rows_evicted"],
        "datastore/waiting_puts": s["waiting_puts"], "datastore/waiting_takes": s["waiting_takes"],
        "datastore/put_rows_per_s": s["put"]["window_rows_per_s"],
        "datastore/put_mb_per_s": s["put"]["window_bytes_per_s"] * mb,
        "datastore/get_rows_per_s": s["get"].get("window_rows_per_s", 0.0),
        "datastore/get_mb_per_s": s["get"].get("window_bytes_per_s", 0.0) * mb,
        "datastore/dead_units": len(s["dead_units"]),
    }
    for p, ps in s["partitions"].items():
        for c, cs in ps["consumers"].items():
            out[f"datastore/{p}/depth/{c}"] = cs["depth"]
            out[f"datastore/{p}/untaken/{c}"] = cs["untaken"]
            out[f"datastore/{p}/in_flight/{c}"] = cs["in_flight"]
        for f, n in ps["unready"].items():
            out[f"datastore/{p}/unready/{f}"] = n
    return {k: float(v) for k, v in out.items()}
