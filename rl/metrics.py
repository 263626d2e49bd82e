"""One metrics stream, several sinks, and the files the dashboard reads.

`MetricsLogger` owns what a run writes about itself in its run directory:
- `metrics.jsonl`: one record per training step (`log`), fanned out to the console and the trackers the
  recipe turns on (rl.sinks);
- `timeline.jsonl`: spans `{"actor", "kind", "start", "end"}` of each worker's activity (`span`, `phase`);
- `status.json`: running / finished / failed / stopped, steps done, start time, links (the Ray dashboard).
It also serves the live dashboard (rl.dashboard) while the run goes on. The dashboard reads only these files
and the data store's rollout log, so `streamrl dashboard RUN_DIR` shows a finished run with the same code.

`phase(name)` times a stretch of the controller's loop and records it both as a metric (`time/<name>_s`)
and as a span on the timeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from rl.core.config import LoggingConfig
from rl.sinks import ConsoleSink, Sink, make_sinks

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
TIMELINE_FLUSH_S = 1.0  # spans reach the file (and the dashboard) at least this often while they come in


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0,
                 links: dict[str, str] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg, self.total_steps, self.start_step = cfg, total_steps, start_step
        self.pending: dict[str, float] = {}
        self.steps_done = start_step
        self.last_step: int | None = None
        self.timeline = open(self.run_dir / "timeline.jsonl", "a")
        self.timeline_lock = threading.Lock()
        self.timeline_flushed = time.time()
        self.sinks: list[Sink] = make_sinks(self.run_dir, cfg, total_steps, start_step)
        self.status: dict[str, Any] = {
            "state": "running", "name": cfg.name, "run_dir": str(self.run_dir.resolve()),
            "step": None, "steps_done": start_step, "total_steps": total_steps, "start_step": start_step,
            "started_at": time.time(), "updated_at": time.time(), "finished_at": None,
            "host": socket.gethostname(), "pid": os.getpid(), "links": {**ray_links(), **(links or {})},
            "trackers": [s.name for s in self.sinks if s.name not in ("console", "jsonl")],
        }
        self.server = None
        if cfg.dashboard:
            from rl.dashboard import DashboardServer

            self.server = DashboardServer(self.run_dir, dashboard_host(cfg.dashboard_host), cfg.dashboard_port)
            self.server.start()
            self.status["dashboard_url"] = self.server.url
            self._print(f"dashboard: {self.server.url}  (after the run: streamrl dashboard {self.run_dir})")
        self._write_status()

    # ------------------------------------------------------------------ spans
    @contextlib.contextmanager
    def phase(self, name: str, actor: str = "controller") -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            t1 = time.time()
            self.pending[f"time/{name}_s"] = self.pending.get(f"time/{name}_s", 0.0) + (t1 - t0)
            self.span(actor, name, t0, t1)

    def span(self, actor: str, kind: str, start: float, end: float) -> None:
        """One stretch of one worker's activity, e.g. ("rollout/0", "generate", t0, t1); any thread."""
        line = json.dumps({"actor": actor, "kind": kind, "start": start, "end": end}) + "\n"
        with self.timeline_lock:
            self.timeline.write(line)
            if time.time() - self.timeline_flushed > TIMELINE_FLUSH_S:
                self._flush_timeline()

    def _flush_timeline(self) -> None:
        self.timeline.flush()
        self.timeline_flushed = time.time()

    def take_phases(self) -> dict[str, float]:
        """The phase times recorded since the last call (a step's, when its record is written later)."""
        out, self.pending = self.pending, {}
        return out

    # ------------------------------------------------------------------ steps
    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, "time": time.time(), **self.pending, **metrics}
        self.pending = {}
        with self.timeline_lock:
            self._flush_timeline()
        for sink in list(self.sinks):
            self._call(sink, "log", step, record)
        self.steps_done += 1
        self.last_step = step
        self.status.update(step=step, steps_done=self.steps_done, updated_at=time.time())
        self._write_status()
        if self.server is not None:
            self.server.poke()
        return record

    def close(self, error: BaseException | None = None) -> None:
        """End the run's record: status.json says how it ended, trackers are closed, the dashboard pushes the
        final state to open pages and stops. Called in the controller's `finally`; without `error` an
        exception on its way out (sys.exc_info) is taken as the cause."""
        if error is None:
            error = sys.exc_info()[1]
        if isinstance(error, (KeyboardInterrupt, asyncio.CancelledError)):
            state = "stopped"
        elif error is not None:
            state = "failed"
        else:
            state = "finished" if self.steps_done >= self.total_steps else "stopped"
        self.status.update(state=state, finished_at=time.time(), updated_at=time.time(),
                           error=None if error is None else f"{type(error).__name__}: {error}"[:2000])
        with self.timeline_lock:
            self.timeline.close()
        self._write_status()
        if self.server is not None:  # first, so open pages show the end without waiting for the trackers
            self.server.stop(final=True)
        for sink in list(self.sinks):
            self._call(sink, "close", state)

    # ------------------------------------------------------------------ helpers
    def _call(self, sink: Sink, method: str, *args: Any) -> None:
        """A tracker that fails is reported once and dropped; the console and metrics.jsonl are not optional."""
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            if sink.name in ("console", "jsonl"):
                raise
            log.warning("metrics sink %s failed in %s (%s: %s); dropped for the rest of the run "
                        "(metrics.jsonl has every step)", sink.name, method, type(exc).__name__, exc)
            if sink in self.sinks:
                self.sinks.remove(sink)

    def _write_status(self) -> None:
        tmp = self.run_dir / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.status, indent=2, default=str))
        os.replace(tmp, self.run_dir / STATUS_FILE)

    def _print(self, text: str) -> None:
        console = next((s for s in self.sinks if isinstance(s, ConsoleSink)), None)
        (console.write if console else print)(text)
        sys.stdout.flush()
        log.info(text)


def dashboard_host(host: str) -> str:
    """`logging.dashboard_host`; auto listens on every interface where people watch from another machine
    (inside a Ray job, or a driver on a multi-node cluster) and on loopback only on a local run."""
    if host != "auto":
        return host
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return "0.0.0.0"
    try:
        import ray

        if ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
            return "0.0.0.0"
    except Exception:
        pass
    return "127.0.0.1"


def ray_links() -> dict[str, str]:
    """Best effort: the Ray dashboard of the cluster this driver is connected to, and this job's page on it.
    (The controller may pass better links to MetricsLogger; these fill in what it did not.)"""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        node = getattr(ray._private.worker, "_global_node", None)  # no public getter once ray.init returned
        url = getattr(node, "webui_url", None)
    except Exception:
        return {}
    if not url:
        return {}
    url = url if url.startswith("http") else f"http://{url}"
    links = {"Ray dashboard": url}
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if job.get("job_submission_id"):
            links["Ray job"] = f"{url}/#/jobs/{job['job_submission_id']}"
    except (ValueError, AttributeError):
        pass
    return links


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_status(run_dir: Path) -> dict[str, Any]:
    """status.json of a run ({} before MetricsLogger wrote it)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def learning_summary(records: list[dict[str, Any]], key: str = "reward/mean") -> dict[str, Any]:
    """Mean of `key` over the first and the last 10% of steps (at least one step each), and the gain; with
    eval rounds (rl.evaluation) also `eval`: held-out reward and pass@k of the first and the last round."""
    vals = [r[key] for r in records if key in r]
    if not vals:
        return {}
    k = max(1, len(vals) // 10)
    first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
    out: dict[str, Any] = {"steps": len(vals), "first10": first, "last10": last, "gain": last - first}
    rounds = [r for r in records if "eval/reward_mean" in r]
    if rounds:
        a, b = rounds[0], rounds[-1]
        out["eval"] = {"rounds": len(rounds), "first_version": a["eval/version"], "last_version": b["eval/version"],
                       "first": a["eval/reward_mean"], "last": b["eval/reward_mean"],
                       "gain": b["eval/reward_mean"] - a["eval/reward_mean"],
                       **{f"{m[5:]}_{w}": r[m] for m in sorted(a) if m.startswith("eval/pass@") for w, r in
                          (("first", a), ("last", b)) if m in r}}
    return out
