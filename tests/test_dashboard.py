"""The dashboard's reader and server on real files (a real rollout-log writer, real HTTP, real SSE), the
MetricsLogger files it reads, and `streamrl dashboard RUN_DIR`. No Ray, no browser: see
test_dashboard_browser.py for the page in Chromium on a real run."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pytest

from datastore.log import RowLog, segments
from rl.config import load_recipe
from rl.dashboard import DashboardServer
from rl.dashboard.reader import RunReader
from rl.metrics import MetricsLogger, dashboard_host, read_status

HTTP_TIMEOUT = 10


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
        return json.load(r)


def write_lines(path: Path, records: list[dict], tail: str = "") -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)


def samples(first: int, n: int, version: int, reward: float) -> pa.Table:
    idx = list(range(first, first + n))
    return pa.table({"index": idx, "prompt": [f"{i}+1=" for i in idx], "response": [str(i + 1) for i in idx],
                     "response_ids": [[1] * (i % 3 + 1) for i in idx], "reward": [reward] * n, "version": [version] * n})


class EventStream:
    """Reads a server-sent-events stream in a thread; `next(timeout)` gives (event, data) or fails saying so."""

    def __init__(self, url: str) -> None:
        self.resp = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        name = None
        try:
            for raw in self.resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.put((name, json.loads(line[6:])))
        except (OSError, ValueError):
            pass
        self.events.put(("closed", None))

    def next(self, timeout: float = 10.0) -> tuple[str, dict]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no server-sent event from the dashboard within {timeout} s") from None


def test_reader_takes_only_complete_appends(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"step": 0, "reward/mean": 0.5, "actor/kl_behaviour": float("nan")}],
                tail='{"step": 1, "rew')  # a line still being written
    write_lines(tmp_path / "timeline.jsonl", [{"actor": "trainer", "kind": "train", "start": 1.0, "end": 2.0}])
    log = RowLog(tmp_path / "datastore", 0, "s1")
    log.append("train", samples(0, 4, version=0, reward=0.0))
    reader = RunReader(tmp_path)
    assert reader.refresh()
    snap = reader.snapshot()
    assert [m["step"] for m in snap["metrics"]] == [0]
    assert snap["metrics"][0]["actor/kl_behaviour"] is None  # NaN made browser-safe
    assert snap["spans"] == [["trainer", "train", 1.0, 2.0]]
    assert snap["rewards"]["versions"] == [0] and snap["samples_total"] == 4
    assert not reader.refresh()  # nothing new

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('ard/mean": 1.0}\n')  # the torn line completes
    log.append("train", samples(4, 4, version=1, reward=1.0))
    assert reader.refresh()
    delta = reader.delta(snap["cursor"])
    assert [m["step"] for m in delta["metrics"]] == [1] and delta["spans"] == []
    dist = delta["rewards"]
    assert dist["versions"] == [0, 1] and dist["mean"] == [0.0, 1.0] and dist["discrete"]
    assert dist["bins"] == [0.0, 1.0] and dist["share"] == [[1.0, 0.0], [0.0, 1.0]]
    found = reader.search_samples("6+1")
    assert [r["index"] for r in found["rows"]] == [6] and found["rows"][0]["length"] == 1
    assert [r["index"] for r in reader.search_samples("", limit=3)["rows"]] == [7, 6, 5]  # newest first

    # a record batch caught half written is read once it is whole, from where the reader had got to
    (segment,) = segments(tmp_path / "datastore", "train")
    schema = pa.ipc.open_stream(pa.OSFile(str(segment))).schema
    batch = samples(8, 2, version=2, reward=0.5).append_column("_logged_at", pa.array([1.0, 1.0]))
    message = batch.cast(schema).to_batches()[0].serialize().to_pybytes()
    with open(segment, "ab") as f:
        f.write(message[:len(message) // 2])
    assert not reader.refresh()
    with open(segment, "ab") as f:
        f.write(message[len(message) // 2:])
    assert reader.refresh()
    assert [r["index"] for r in reader.search_samples("", limit=2)["rows"]] == [9, 8]
    assert reader.snapshot()["rewards"]["versions"] == [0, 1, 2]
    log.close()


def test_server_serves_page_offline_and_streams_appends(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"step": 0, "reward/mean": 0.25}])
    server = DashboardServer(tmp_path, "127.0.0.1", 0, poll_s=0.2).start()
    try:
        with urllib.request.urlopen(server.url, timeout=HTTP_TIMEOUT) as r:
            page = r.read().decode()
        assert 'id="chart-timeline"' in page and 'src="/static/plotly.min.js"' in page
        assert "http://" not in page and "https://" not in page  # nothing from the network
        with urllib.request.urlopen(server.url + "static/plotly.min.js", timeout=HTTP_TIMEOUT) as r:
            assert len(r.read()) > 1_000_000
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url + "static/../../metrics.py", timeout=HTTP_TIMEOUT)

        stream = EventStream(server.url + "events")
        name, snap = stream.next()
        assert name == "snapshot" and [m["step"] for m in snap["metrics"]] == [0]
        write_lines(tmp_path / "metrics.jsonl", [{"step": 1, "reward/mean": 0.75}])
        write_lines(tmp_path / "timeline.jsonl", [{"actor": "rollout/0", "kind": "generate", "start": 1, "end": 3}])
        server.poke()
        got_metrics, got_spans = [], []
        while not (got_metrics and got_spans):
            name, delta = stream.next()
            assert name == "delta"
            got_metrics += delta["metrics"]
            got_spans += delta["spans"]
        assert [m["reward/mean"] for m in got_metrics] == [0.75]
        assert got_spans == [["rollout/0", "generate", 1, 3]]
        assert get_json(server.url + "api/snapshot")["cursor"]["metrics"] == 2

        (tmp_path / "status.json").write_text(json.dumps({"state": "finished", "steps_done": 2}))
        server.stop(final=True)
        events = [stream.next() for _ in range(2)]
        assert events[0][0] == "delta" and events[0][1]["status"]["state"] == "finished"
        assert events[1][0] == "end"
    finally:
        server.stop()


def test_metrics_logger_writes_status_and_serves_live(tmp_path):
    cfg = load_recipe(None, ["logging.progress=false", "logging.dashboard_host=127.0.0.1"]).logging
    ml = MetricsLogger(tmp_path, cfg, total_steps=2, links={"Ray dashboard": "http://head:8265"})
    url = ml.server.url
    status = read_status(tmp_path)
    assert status["state"] == "running" and status["dashboard_url"] == url and status["total_steps"] == 2
    assert status["links"]["Ray dashboard"] == "http://head:8265"
    with ml.phase("train"):
        time.sleep(0.01)
    ml.span("rollout/0", "generate", 100.0, 101.5)
    ml.log(0, {"reward/mean": 0.5, "staleness/hist": {"0": 3, "1": 1}})
    deadline = time.time() + 10
    while get_json(url + "api/snapshot")["cursor"]["metrics"] < 1:
        assert time.time() < deadline, "the dashboard did not pick up metrics.jsonl's first record within 10 s"
        time.sleep(0.1)
    snap = get_json(url + "api/snapshot")
    assert snap["metrics"][0]["time/train_s"] > 0 and snap["metrics"][0]["staleness/hist"] == {"0": 3, "1": 1}
    assert {(s[0], s[1]) for s in snap["spans"]} == {("controller", "train"), ("rollout/0", "generate")}
    assert snap["status"]["steps_done"] == 1
    ml.log(1, {"reward/mean": 0.75})
    ml.close()
    assert read_status(tmp_path)["state"] == "finished"
    with pytest.raises(OSError):  # the server stopped with the run
        urllib.request.urlopen(url + "healthz", timeout=2)


def test_metrics_logger_records_a_failed_run(tmp_path):
    cfg = load_recipe(None, ["logging.progress=false", "logging.dashboard=false"]).logging
    ml = MetricsLogger(tmp_path, cfg, total_steps=5)
    ml.log(0, {"reward/mean": 0.1})
    with pytest.raises(RuntimeError):
        try:
            raise RuntimeError("engine 0 died")
        finally:
            ml.close()  # as the controller calls it: in a finally, the error on its way out
    status = read_status(tmp_path)
    assert status["state"] == "failed" and "engine 0 died" in status["error"] and status["steps_done"] == 1
    assert "dashboard_url" not in status


def test_cli_dashboard_serves_a_run_directory(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [{"step": s, "reward/mean": s / 10} for s in range(3)])
    (tmp_path / "status.json").write_text(json.dumps({"state": "finished", "steps_done": 3, "total_steps": 3}))
    proc = subprocess.Popen([sys.executable, "-m", "rl.cli", "dashboard", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            raise AssertionError("`streamrl dashboard` printed no URL within 60 s") from None
        assert first.startswith(f"dashboard of {tmp_path}: http://127.0.0.1:"), first
        url = first.split(": ", 1)[1].split()[0]
        snap = get_json(url + "api/snapshot")
        assert [m["reward/mean"] for m in snap["metrics"]] == [0.0, 0.1, 0.2]
        assert snap["status"]["state"] == "finished"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_dashboard_names_a_missing_run_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rl.cli", "dashboard", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "run directory not found" in out.stderr


def test_dashboard_host_auto_opens_up_only_inside_a_ray_job(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert dashboard_host("10.1.2.3") == "10.1.2.3"
    assert dashboard_host("auto") == "127.0.0.1"  # a local run (a local Ray has one node)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a Ray job's driver has this
    assert dashboard_host("auto") == "0.0.0.0"
