"""What the dashboard shows, read from a run directory's files as they grow.

`RunReader.refresh()` reads only what was appended since the last call: new complete lines of
metrics.jsonl and timeline.jsonl (a line still being written waits for the next call), status.json, and new
record batches of the data store's rollout log (<run_dir>/datastore, docs/datastore.md). The live server and
`streamrl dashboard RUN_DIR` both use it, so a finished run looks the same as it did live.

From the rollout log it keeps per-version rewards (for the reward distribution), the most recent samples
(for the table and its search) and the latest reward errors (their messages are in the log's `reward_info`
column). Memory stays flat however long the run: rewards are kept as 8-byte floats, the latest MAX_SPANS
spans, and at most MAX_METRICS step records (past it the older half is thinned to every other step, so the
charts keep the whole run's shape and every recent step).
"""

from __future__ import annotations

import json
import math
import os
import threading
from array import array
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from datastore.log import partitions, segments
from rl.dashboard.labels import metric_label

SAMPLE_COLUMNS = ["prompt", "response", "reward", "version", "finish_reason", "worker", "response_ids"]
MAX_SAMPLES = 5000  # recent samples kept for the table and its search
MAX_SPANS = 200_000  # timeline spans kept (oldest dropped first)
MAX_METRICS = 4000  # step records kept for the charts (past it the older half is thinned: thin_older_half)
TEXT_CHARS = 4000  # longest prompt / response text kept per sample
REWARD_BINS = 20
MAX_VERSION_COLUMNS = 100  # past this many policy versions the reward heatmap pools neighbouring versions
MAX_ERRORS = 20  # latest reward errors kept (with their messages)
RECENT_STEPS = 20  # the time-left estimate uses the pace of the last this many steps


class JsonlTail:
    """The complete lines appended to a JSON-lines file since the last read; a torn last line waits."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self.offset:  # replaced by a shorter file: start over
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in data[:end + 1].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash; the rest of the file is still good
        return out


class RolloutLogTail:
    """New rows of the rollout log. Each segment is an Arrow IPC stream that only grows; per segment it keeps
    the byte offset after the last complete message and the stream's schema, and reads on from there, so a
    refresh costs what was appended, however long the run. A message still being written waits."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.seen: dict[Path, tuple[int, pa.Schema | None]] = {}  # segment -> (offset read to, schema)
        self.indexes: dict[str, set[int]] = {}

    def read(self) -> list[dict[str, Any]]:
        if not self.log_dir.exists():
            return []
        rows: list[dict[str, Any]] = []
        for part in partitions(self.log_dir):
            done = self.indexes.setdefault(part, set())
            for path in segments(self.log_dir, part):
                offset, schema = self.seen.get(path, (0, None))
                if path.stat().st_size <= offset:
                    continue
                offset, schema, new = _read_messages(path, offset, schema)
                self.seen[path] = (offset, schema)
                for row in new:
                    if row["index"] not in done:  # a row is logged once; a recovered log may repeat it
                        done.add(row["index"])
                        rows.append({"partition": part, **row})
        return rows


def _read_messages(path: Path, offset: int, schema: pa.Schema | None) -> tuple[int, pa.Schema | None, list]:
    """Rows of the complete IPC messages of `path` from `offset`; returns the offset after the last one."""
    rows: list[dict[str, Any]] = []
    try:
        with pa.memory_map(str(path)) as source:
            source.seek(offset)
            reader = pa.ipc.MessageReader.open_stream(source)
            while True:
                try:
                    message = reader.read_next_message()
                except StopIteration:  # end of what is there (or the writer's end-of-stream mark)
                    break
                if message.type == "schema":
                    schema = pa.ipc.read_schema(message)
                elif message.type == "record batch" and schema is not None:
                    rows.extend(_sample_rows(pa.ipc.read_record_batch(message, schema)))
                offset = source.tell()
    except (pa.ArrowInvalid, OSError, ValueError):
        pass  # a message still being written (or nothing yet): read from `offset` next time
    return offset, schema, rows


def _sample_rows(batch: pa.RecordBatch) -> list[dict[str, Any]]:
    names = set(batch.schema.names)
    cols = {c: batch.column(c).to_pylist() for c in ["index", "_logged_at", "reward_info", *SAMPLE_COLUMNS]
            if c in names and c != "response_ids"}
    if "response_ids" in names:
        cols["length"] = pc.list_value_length(batch.column("response_ids")).to_pylist()
    out = []
    for i in range(batch.num_rows):
        row = {k: v[i] for k, v in cols.items()}
        for k in ("prompt", "response"):
            if isinstance(row.get(k), str) and len(row[k]) > TEXT_CHARS:
                row[k] = row[k][:TEXT_CHARS] + " …"
        row["logged_at"] = row.pop("_logged_at", None)
        error = reward_error(row.pop("reward_info", None))
        if error:
            row["error"] = error
        out.append(row)
    return out


def reward_error(info: Any) -> str:
    """The error message in a row's `reward_info` (JSON written by the reward worker), or ""."""
    if not isinstance(info, str) or not info:
        return ""
    try:
        parsed = json.loads(info)
    except ValueError:
        return ""
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return str(error) if error else ""


class RunReader:
    """Everything the page needs from one run directory; thread-safe (the server's poller refreshes it,
    request threads read it)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.lock = threading.Lock()  # guards the state below against the request threads
        self.refreshing = threading.Lock()  # one refresh at a time (the tails keep file offsets)
        self.metrics_tail = JsonlTail(self.run_dir / "metrics.jsonl")
        self.timeline_tail = JsonlTail(self.run_dir / "timeline.jsonl")
        self.rollout_tail = RolloutLogTail(self.run_dir / "datastore")
        self.metrics: list[dict[str, Any]] = []
        self.metrics_total = 0  # records read so far (kept or thinned out): the delta cursor
        self.spans: list[list[Any]] = []
        self.spans_dropped = 0
        self.samples: deque[dict[str, Any]] = deque(maxlen=MAX_SAMPLES)
        self.samples_total = 0
        self.rewards: dict[int, array] = {}  # version -> its samples' rewards (array('d'): 8 bytes each)
        self.errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)
        self.errors_total = 0
        self.labels: dict[str, str] = {}
        self.status: dict[str, Any] = {}
        self.version = 0  # bumped whenever anything changed

    def refresh(self) -> bool:
        """Read what was appended since the last call; True if anything changed."""
        with self.refreshing:
            return self._refresh()

    def _refresh(self) -> bool:
        metrics = [clean(r) for r in self.metrics_tail.read()]
        spans = [[str(s.get("actor", "?")), str(s.get("kind", "?")), s["start"], s["end"]]
                 for s in self.timeline_tail.read() if _finite(s.get("start")) and _finite(s.get("end"))]
        samples = self.rollout_tail.read()
        status = self._read_status()
        with self.lock:
            changed = bool(metrics or spans or samples) or status != self.status
            self.metrics.extend(metrics)
            self.metrics_total += len(metrics)
            if len(self.metrics) > MAX_METRICS:
                thin_older_half(self.metrics)
            for record in metrics:
                for key in record:
                    if key not in self.labels:
                        self.labels[key] = metric_label(key)
            self.spans.extend(spans)
            if len(self.spans) > MAX_SPANS:
                cut = len(self.spans) - MAX_SPANS
                del self.spans[:cut]
                self.spans_dropped += cut
            for s in samples:
                r, v = s.get("reward"), s.get("version")
                if isinstance(r, (int, float)) and math.isfinite(r) and isinstance(v, int):
                    self.rewards.setdefault(v, array("d")).append(float(r))
                if s.get("error"):
                    self.errors.append(clean({"error": s["error"], "version": v, "index": s.get("index"),
                                              "prompt": _short(s.get("prompt")),
                                              "response": _short(s.get("response"))}))
                    self.errors_total += 1
            self.samples.extend(clean(s) for s in samples)
            self.samples_total += len(samples)
            self.status = status
            if changed:
                self.version += 1
        return changed

    def _read_status(self) -> dict[str, Any]:
        try:
            return clean(json.loads((self.run_dir / "status.json").read_text()))
        except (FileNotFoundError, ValueError):
            return self.status  # not written yet, or caught mid-replace: keep the last one

    @property
    def name(self) -> str:
        """The run's name (status.json's, else the directory's): the legend entry when runs are compared."""
        return str(self.status.get("name") or self.run_dir.name)

    # ------------------------------------------------------------------ what the page gets
    def snapshot(self) -> dict[str, Any]:
        """The whole state; `cursor` says where the next `delta` starts."""
        with self.lock:
            return {"kind": "snapshot", "run_dir": str(self.run_dir), "name": self.name, "status": self.status,
                    "metrics": list(self.metrics), "spans": list(self.spans), "rewards": self._reward_dist(),
                    **self._small(), "cursor": self._cursor()}

    def delta(self, cursor: dict[str, int]) -> dict[str, Any]:
        """What was added since `cursor` (from a snapshot or the last delta)."""
        with self.lock:
            new = min(self.metrics_total - cursor["metrics"], len(self.metrics))
            m0 = len(self.metrics) - max(new, 0)
            s0 = max(cursor["spans"] - self.spans_dropped, 0)
            return {"kind": "delta", "name": self.name, "status": self.status, "metrics": self.metrics[m0:],
                    "spans": self.spans[s0:],
                    "rewards": self._reward_dist() if cursor["samples"] != self.samples_total else None,
                    **self._small(), "cursor": self._cursor()}

    def _small(self) -> dict[str, Any]:
        """The parts sent whole with every event (each a few KB at most)."""
        return {"samples_total": self.samples_total, "pace": recent_pace(self.metrics, self.status),
                "labels": dict(self.labels), "errors": list(reversed(self.errors)), "errors_total": self.errors_total}

    def _cursor(self) -> dict[str, int]:
        return {"metrics": self.metrics_total, "spans": self.spans_dropped + len(self.spans),
                "samples": self.samples_total}

    def _reward_dist(self) -> dict[str, Any]:
        return reward_distribution(self.rewards)

    def search_samples(self, query: str = "", limit: int = 100) -> dict[str, Any]:
        """The newest kept samples whose prompt, response, version or reward contains `query` (any case)."""
        q = query.strip().lower()
        with self.lock:
            kept = list(self.samples)
            total = self.samples_total
        hits = []
        for s in reversed(kept):
            if not q or q in _haystack(s):
                hits.append(s)
                if len(hits) >= limit:
                    break
        return {"query": query, "rows": hits, "kept": len(kept), "total": total,
                "has_log": (self.run_dir / "datastore").exists()}


def thin_older_half(records: list[Any]) -> None:
    """Drop every other item of the list's older half, in place: a list grown past its cap shrinks by a quarter,
    its recent half stays whole, and older stretches get sparser the older they are (a chart's shape survives)."""
    half = len(records) // 2
    records[:half] = records[:half:2]


def reward_distribution(rewards: Mapping[int, Sequence[float]],
                        max_columns: int = MAX_VERSION_COLUMNS) -> dict[str, Any]:
    """Per column of policy versions: count, mean, and the share of its samples in each reward bin.

    A column is one version, or, past `max_columns` versions, `width` consecutive ones pooled (500 versions
    drawn one column each make a barcode); `versions` holds each column's first version, `last` its last.
    Bins are the distinct rewards when there are at most REWARD_BINS of them (0/1 rewards: two rows), else
    REWARD_BINS equal bins spanning every reward seen; `bins` holds each bin's value (its centre)."""
    if not rewards:
        return {"versions": []}
    lo_v, hi_v = min(rewards), max(rewards)
    width = max(1, math.ceil((hi_v - lo_v + 1) / max_columns))
    columns: dict[int, list[float]] = {}
    for v in sorted(rewards):
        columns.setdefault(lo_v + (v - lo_v) // width * width, []).extend(rewards[v])
    versions = sorted(columns)
    distinct = sorted({x for xs in columns.values() for x in xs})
    if len(distinct) <= REWARD_BINS:
        where = {x: i for i, x in enumerate(distinct)}
        bins, place = distinct, where.__getitem__
    else:
        lo, step = distinct[0], (distinct[-1] - distinct[0]) / REWARD_BINS
        bins = [lo + (i + 0.5) * step for i in range(REWARD_BINS)]
        place = lambda x: min(int((x - lo) / step), REWARD_BINS - 1)  # noqa: E731
    out: dict[str, Any] = {"versions": versions, "last": [min(v + width - 1, hi_v) for v in versions],
                           "width": width, "bins": bins, "discrete": len(distinct) <= REWARD_BINS,
                           "n": [], "mean": [], "share": []}
    for v in versions:
        xs = columns[v]
        counts = [0] * len(bins)
        for x in xs:
            counts[place(x)] += 1
        out["n"].append(len(xs))
        out["mean"].append(sum(xs) / len(xs))
        out["share"].append([c / len(xs) for c in counts])
    return out


def recent_pace(metrics: list[dict[str, Any]], status: dict[str, Any],
                window: int = RECENT_STEPS) -> dict[str, Any] | None:
    """Seconds per step over the last `window` steps of this session, for the time-left estimate.

    The whole-run average counts the start-up (engines loading, compiling) and any slow first steps, and so
    overestimates what is left for a long while. Records are taken from the end of metrics.jsonl back to
    where the step stops falling (a resumed run's session starts over at its checkpoint's step). With one
    step only, the pace since `status.started_at` is all there is. None: no step with a time yet."""
    times: list[float] = []
    step = None
    for record in reversed(metrics):
        t, s = record.get("time"), record.get("step")
        if not (_finite(t) and isinstance(s, int)) or (step is not None and s >= step):
            break
        times.append(float(t))
        step = s
        if len(times) > window:
            break
    if not times:
        return None
    if len(times) == 1:
        started = status.get("started_at")
        if not _finite(started) or times[0] <= started:
            return None
        return {"s_per_step": times[0] - started, "steps": 1, "last_time": times[0]}
    return {"s_per_step": (times[0] - times[-1]) / (len(times) - 1), "steps": len(times) - 1, "last_time": times[0]}


def _haystack(s: dict[str, Any]) -> str:
    return " ".join(str(s.get(k, "")) for k in ("prompt", "response", "version", "reward", "worker")).lower()


def _short(text: Any, chars: int = 300) -> Any:
    return text[:chars] + " …" if isinstance(text, str) and len(text) > chars else text


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def clean(x: Any) -> Any:
    """JSON the browser can parse: NaN and infinities (which Python's json writes) become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
