"""The store's durable log: finished rows (Arrow IPC stream segments) and consumption records (JSON lines).

Layout of a log directory (documented in docs/datastore.md; it is also the user's rollout dump):

    <log_dir>/store.json                          what wrote the log (fields, consumers, sessions)
    <log_dir>/rows/<partition>/u<unit>-<session>-<seq>.arrows
                                                  Arrow IPC *stream* files: one record batch per put that
                                                  finished rows; columns `index`, the finished fields, and
                                                  `_logged_at` (unix seconds); buffers zstd-compressed
                                                  (pyarrow and other Arrow readers decompress on read)
    <log_dir>/consumed.jsonl                      {"partition", "consumer", "op": "take"|"discard",
                                                  "indexes": [...], "time"} per take of a durable consumer

A row is written once, when it becomes finished; a consumption record is written (and flushed) before the
take is answered, so after a crash a durable consumer never gets a row twice. A process killed mid-write
leaves at most a truncated last batch or line, which the readers skip.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

log = logging.getLogger(__name__)

ROWS = "rows"
CONSUMED = "consumed.jsonl"
META = "store.json"
LOGGED_AT = "_logged_at"
SUFFIX = ".arrows"
COMPRESSION = "zstd"  # halves the log of the CPU default (many small batches of int64 id lists; issue 19)


def session_id() -> str:
    """Sortable and unique per store start: segment files of a restarted store never collide."""
    return time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid() % 100000:05d}{time.monotonic_ns() % 1000:03d}"


class RowLog:
    """One storage unit's writer: an open IPC stream per partition, rolled to a new segment when the
    schema changes (e.g. a field first seen with null values)."""

    def __init__(self, log_dir: str | Path, unit: int, session: str, fsync: bool = False) -> None:
        self.dir, self.unit, self.session, self.fsync = Path(log_dir) / ROWS, unit, session, fsync
        self.writers: dict[str, tuple[Any, Any, pa.Schema]] = {}
        self.seq: dict[str, int] = defaultdict(int)
        self.rows = 0
        self.bytes = 0

    def append(self, partition: str, table: pa.Table) -> None:
        table = table.append_column(LOGGED_AT, pa.array([time.time()] * table.num_rows, pa.float64()))
        w = self.writers.get(partition)
        if w is not None and not table.schema.equals(w[2]):
            try:
                table = table.cast(w[2])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                self._close(partition)
                w = None
        if w is None:
            w = self._open(partition, table.schema)
        f, writer, _ = w
        writer.write_table(table)
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        self.rows += table.num_rows
        self.bytes += table.nbytes

    def _open(self, partition: str, schema: pa.Schema) -> tuple[Any, Any, pa.Schema]:
        folder = self.dir / partition
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"u{self.unit:03d}-{self.session}-{self.seq[partition]:04d}{SUFFIX}"
        self.seq[partition] += 1
        f = open(path, "wb")
        options = pa.ipc.IpcWriteOptions(compression=COMPRESSION if pa.Codec.is_available(COMPRESSION) else None)
        w = self.writers[partition] = (f, pa.ipc.new_stream(f, schema, options=options), schema)
        return w

    def _close(self, partition: str) -> None:
        f, writer, _ = self.writers.pop(partition)
        try:
            writer.close()
        finally:
            f.close()

    def close(self) -> None:
        for p in list(self.writers):
            self._close(p)


class ConsumptionLog:
    """Append-only JSON lines of takes and discards by durable consumers, flushed per record."""

    def __init__(self, log_dir: str | Path, fsync: bool = False) -> None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / CONSUMED
        self.f = open(self.path, "a")
        self.fsync = fsync

    def append(self, partition: str, consumer: str, op: str, indexes: list[int]) -> None:
        self.f.write(json.dumps({"partition": partition, "consumer": consumer, "op": op,
                                 "indexes": indexes, "time": time.time()}) + "\n")
        self.f.flush()
        if self.fsync:
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------- reading
def partitions(log_dir: str | Path) -> list[str]:
    root = Path(log_dir) / ROWS
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def segments(log_dir: str | Path, partition: str) -> list[Path]:
    """Segment files of a partition, oldest session first."""
    folder = Path(log_dir) / ROWS / partition
    return sorted(folder.glob(f"*{SUFFIX}"), key=lambda p: (p.name.split("-", 1)[1], p.name)) if folder.exists() else []


def read_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The record batches of one segment; a truncated tail (a writer killed mid-batch) ends it quietly."""
    with pa.OSFile(str(path)) as source:  # batches are read into memory (they outlive the file handle)
        try:
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowInvalid, OSError):
            return  # empty file: the writer died before the schema was written
        while True:
            try:
                yield reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError) as exc:
                log.warning("log segment %s ends in a truncated batch (%s); the rows before it are kept", path, exc)
                return


def read_rows(log_dir: str | Path, partition: str, columns: list[str] | None = None) -> pa.Table:
    """Every finished row of `partition` in the log, one row per index (the last write wins), sorted by
    index. This is the rollout dump reader: `read_rows(run_dir / "datastore", "train").to_pandas()`."""
    tables = []
    for path in segments(log_dir, partition):
        batches = list(read_batches(path))
        if batches:
            t = pa.Table.from_batches(batches)
            tables.append(t.select(["index", *columns]) if columns else t)
    if not tables:
        return pa.table({"index": pa.array([], pa.int64())})
    table = pa.concat_tables(tables, promote_options="permissive")
    idx = table.column("index").to_pylist()
    last = {i: k for k, i in enumerate(idx)}
    keep = sorted(last.values(), key=lambda k: idx[k])
    return table.take(pa.array(keep, pa.int64()))


def read_consumed(log_dir: str | Path) -> dict[str, dict[str, set[int]]]:
    """partition -> consumer -> indexes taken or discarded, from the consumption log."""
    out: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    path = Path(log_dir) / CONSUMED
    if not path.exists():
        return out
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is cut short (a crash mid-write); skipped", path, n)
                continue
            out[rec["partition"]][rec["consumer"]].update(rec["indexes"])
    return out


def rewrite_consumed(log_dir: str | Path, consumed: dict[str, dict[str, Iterable[int]]]) -> None:
    """Replace the consumption log by one compact record per (partition, consumer), atomically."""
    path = Path(log_dir) / CONSUMED
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for p, by_consumer in consumed.items():
            for c, idxs in by_consumer.items():
                f.write(json.dumps({"partition": p, "consumer": c, "op": "recovered", "indexes": sorted(idxs),
                                    "time": time.time()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_meta(log_dir: str | Path, meta: dict[str, Any]) -> None:
    path = Path(log_dir) / META
    old = json.loads(path.read_text()) if path.exists() else {}
    sessions = old.get("sessions", []) + [meta.get("session")]
    path.write_text(json.dumps({**old, **meta, "sessions": sessions}, indent=2) + "\n")
