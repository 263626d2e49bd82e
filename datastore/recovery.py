"""Reading a store back from its log after a crash or a restart.

Every finished row in the log comes back, except rows that every required consumer had taken or
discarded before the restart: those had been evicted and stay evicted (a late write to them is refused).
A durable consumer's takes come back too, so it never gets a row twice across the restart; rows it had
not taken become available to it again. Consumption records of rows that never finished (and so are not
in the log) are dropped, and the consumption log is rewritten compactly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from datastore import log as dlog
from datastore.ledger import IndexSet
from rl.core.waits import wait

if TYPE_CHECKING:
    from datastore.client import DataStore

log = logging.getLogger(__name__)


def replay(store: "DataStore", log_dir: str, required: list[str], chunk_rows: int = 4096) -> dict[str, Any]:
    """Put the log's live rows back into `store` (a fresh one) and restore consumption; returns per
    partition: rows in the log, rows replayed, rows evicted, and `next_index` (max index + 1)."""
    consumed = dlog.read_consumed(log_dir)
    kept: dict[str, dict[str, list[int]]] = {}
    report: dict[str, Any] = {}
    for partition in dlog.partitions(log_dir):
        by_consumer = consumed.get(partition, {})
        needed = [by_consumer.get(c, set()) for c in required]
        logged: set[int] = set()
        evicted = IndexSet()
        pending = _Pending(store, partition, chunk_rows)
        for path in dlog.segments(log_dir, partition):
            for batch in dlog.read_batches(path):
                idx = batch.column("index").to_pylist()
                logged.update(idx)
                keep = []
                for k, i in enumerate(idx):
                    if required and all(i in s for s in needed):
                        evicted.add(i)
                    else:
                        keep.append(k)
                if keep:
                    pending.add(pa.Table.from_batches([batch]).take(pa.array(keep, pa.int64())))
        pending.flush()
        kept[partition] = {c: sorted(s & logged) for c, s in by_consumer.items()}
        live = {c: [i for i in idxs if i not in evicted] for c, idxs in kept[partition].items()}
        wait(store.controller.restore.remote(partition, live, evicted), store.timeout_s,
             f"restore of consumption records of '{partition}'", "the data store controller")
        report[partition] = {"rows_in_log": len(logged), "replayed": pending.rows, "evicted": len(evicted),
                             "next_index": max(logged, default=-1) + 1}
        log.info("data store: recovered partition '%s' from %s: %s", partition, log_dir, report[partition])
    if consumed or kept:
        dlog.rewrite_consumed(log_dir, kept)
    return report


class _Pending:
    """Logged rows waiting to be put back, in puts of about `chunk_rows` rows (log batches can be tiny)."""

    def __init__(self, store: "DataStore", partition: str, chunk_rows: int) -> None:
        self.store, self.partition, self.chunk_rows = store, partition, chunk_rows
        self.tables: list[pa.Table] = []
        self.n = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if self.tables and not table.schema.equals(self.tables[0].schema):
            self.flush()
        self.tables.append(table)
        self.n += table.num_rows
        if self.n >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.tables:
            return
        table = pa.concat_tables(self.tables)
        self.tables, self.n = [], 0
        idx = table.column("index").to_pylist()
        table = table.drop_columns([c for c in ("index", dlog.LOGGED_AT) if c in table.column_names])
        if len(set(idx)) != len(idx):  # a row logged twice: the last copy wins
            last = {i: k for k, i in enumerate(idx)}
            table = table.take(pa.array(sorted(last.values()), pa.int64()))
            idx = [idx[k] for k in sorted(last.values())]
        refs = self.store._submit_put(self.partition, idx, table, self.store.timeout_s, replay=True)
        self.store._wait_units(refs, self.store.timeout_s, f"replay of {len(idx)} logged rows of '{self.partition}'")
        self.rows += len(idx)
