"""The dashboard's reader and server on real files (a real rollout-log writer, real HTTP, real SSE), the
MetricsLogger files it reads, and `streamrl dashboard RUN_DIR...` (serving, comparing, exporting). No Ray,
no browser: see test_dashboard_browser.py for the page in Chromium on a real run. `write_run` makes a
realistic run directory without running anything (the browser tests use it too)."""

from __future__ import annotations

import json
import queue
import random
import re
import signal
import socket
import struct
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
from rl.cli import main as cli_main
from rl.core.config import load_recipe
from rl.dashboard import DashboardServer
from rl.dashboard.export import export_data
from rl.dashboard.labels import metric_label
from rl.dashboard.reader import MAX_VERSION_COLUMNS, RunReader, recent_pace, reward_distribution
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


QUEUE_KEYS = ["datastore/train/depth/trainer", "datastore/train/in_flight/trainer", "datastore/train/depth/reward",
              "datastore/train/in_flight/reward", "datastore/train/unready/reward", "datastore/waiting_puts",
              "datastore/waiting_takes", "datastore/rows_held"]


def write_run(run_dir: Path, name: str, steps: int, *, total_steps: int | None = None, versions: int | None = None,
              skill: float = 1.0, state: str = "finished", now: float | None = None, seed: int = 0) -> Path:
    """A run directory as a real run leaves it: metrics.jsonl (every key the page draws, one record a step, a
    slow first step then 2 s a step, the last at `now`), timeline.jsonl, status.json and a rollout log of
    `versions` policy versions, 8 samples each, every 7th sample a reward error with its message."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time() if now is None else now
    started = now - 30 - 2 * (steps - 1)  # step 0 ends 30 s in (start-up), then a step every 2 s
    records, spans = [], []
    for s in range(steps):
        t = started + 30 + 2 * s
        reward = min(1.0, skill * s / steps + rng.uniform(-0.05, 0.05))
        depth = 8 if s % 25 else 0
        records.append({
            "step": s, "time": t, "reward/mean": reward, "reward/std": 0.2, "response/len_mean": 20 + rng.random(),
            "actor/kl_behaviour": rng.random() / 100, "actor/entropy": 1.4 - s / steps, "actor/clip_frac": 0.0,
            "actor/grad_norm": 1 + rng.random(), "actor/loss": rng.uniform(-0.1, 0.1),
            "throughput/gen_tokens_per_s": 4000 + 500 * rng.random(), "throughput/rewarded_per_s": 20 + rng.random(),
            "throughput/samples_per_s": 19 + rng.random(), "staleness/hist": {"0": 2, "1": 6},
            "staleness/mean": 0.75, "staleness/max": 1, "time/train_s": 1.2, "time/sync_s": 0.3,
            "time/update_s": 0.9, "reward/errors": 1 if s % 3 == 0 else 0,
            **dict(zip(QUEUE_KEYS, [depth, 8, 1, 4, 1, 0, 1, 1500 + 3 * s])),
        })
        spans += [{"actor": "trainer", "kind": "train", "start": t - 1.9, "end": t - 0.4},
                  {"actor": "trainer", "kind": "sync", "start": t - 0.4, "end": t - 0.1},
                  {"actor": "rollout/0", "kind": "generate", "start": t - 2, "end": t - 0.5},
                  {"actor": "rollout/0", "kind": "load_weights", "start": t - 0.4, "end": t - 0.2},
                  {"actor": "reward/0", "kind": "reward", "start": t - 1.5, "end": t - 1.0}]
    write_lines(run_dir / "metrics.jsonl", records)
    write_lines(run_dir / "timeline.jsonl", spans)
    (run_dir / "status.json").write_text(json.dumps({
        "name": name, "state": state, "step": steps - 1, "steps_done": steps, "total_steps": total_steps or steps,
        "start_step": 0, "started_at": started, "finished_at": now if state == "finished" else None}))
    log = RowLog(run_dir / "datastore", 0, "s1")
    n = 8 * (versions if versions is not None else steps)
    idx = list(range(n))
    log.append("train", pa.table({
        "index": idx, "prompt": [f"{i % 50}+{i % 7}=" for i in idx], "response": [str(i % 50 + i % 7) for i in idx],
        "response_ids": [[1] * (1 + i % 3) for i in idx],
        "reward": [float(rng.random() < skill * (i // 8) / max(n // 8, 1)) for i in idx],
        "reward_info": [json.dumps({"error": f"raised ValueError: no number in sample {i}"}) if i % 7 == 3 else ""
                        for i in idx],
        "version": [i // 8 for i in idx], "finish_reason": ["stop"] * n, "worker": [0] * n}))
    log.close()
    return run_dir


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


def test_reader_memory_is_bounded_and_deltas_stay_exact(tmp_path, monkeypatch):
    """Past MAX_METRICS records the older half is thinned (a long run's page keeps its shape in flat memory);
    every new record still reaches an open page exactly once."""
    monkeypatch.setattr("rl.dashboard.reader.MAX_METRICS", 10)
    write_lines(tmp_path / "metrics.jsonl", [{"step": s} for s in range(10)])
    reader = RunReader(tmp_path)
    reader.refresh()
    cursor = reader.snapshot()["cursor"]
    write_lines(tmp_path / "metrics.jsonl", [{"step": s} for s in range(10, 13)])
    reader.refresh()
    snap = reader.snapshot()
    assert len(snap["metrics"]) <= 10 and snap["cursor"]["metrics"] == 13
    assert [m["step"] for m in snap["metrics"]][-6:] == list(range(7, 13))  # the recent half whole
    assert [m["step"] for m in snap["metrics"]][0] == 0  # the start of the run kept
    assert [m["step"] for m in reader.delta(cursor)["metrics"]] == [10, 11, 12]
    assert reader.delta(snap["cursor"])["metrics"] == []


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


# ---------------------------------------------------------------- issue 16: the dashboard without rough edges
def test_reward_distribution_pools_versions_past_max_columns():
    few = reward_distribution({v: [float(v % 2)] * 4 for v in range(MAX_VERSION_COLUMNS)})
    assert few["width"] == 1 and few["versions"] == few["last"] == list(range(MAX_VERSION_COLUMNS))

    # 500 versions, reward 1 for every 5th: one column per 5 versions, each with a fifth of its samples right
    many = reward_distribution({v: [1.0 if v % 5 == 0 else 0.0] * 4 for v in range(500)})
    assert many["width"] == 5 and len(many["versions"]) == MAX_VERSION_COLUMNS
    assert many["versions"][:3] == [0, 5, 10] and many["last"][:3] == [4, 9, 14] and many["last"][-1] == 499
    assert many["n"] == [20] * MAX_VERSION_COLUMNS and many["bins"] == [0.0, 1.0]
    assert all(share == [0.8, 0.2] for share in many["share"]) and all(m == 0.2 for m in many["mean"])

    # versions need not start at 0 (a resumed run's log), and the last column may be partial
    odd = reward_distribution({v: [0.5] for v in range(1000, 1301)})
    assert odd["width"] == 4 and odd["versions"][0] == 1000 and odd["last"][-1] == 1300
    assert odd["n"][-1] == 1 and sum(odd["n"]) == 301


def test_time_left_uses_the_recent_pace():
    started = 1000.0
    # a 60 s start-up before step 0 ends, then 2 s a step: the whole-run average would be ~3.2 s a step
    metrics = [{"step": s, "time": started + 60 + 2 * s} for s in range(50)]
    pace = recent_pace(metrics, {"started_at": started}, window=20)
    assert pace == {"s_per_step": 2.0, "steps": 20, "last_time": started + 60 + 98}
    assert (metrics[-1]["time"] - started) / 50 > 3.1  # what the old estimate used

    # a resumed run's second session (steps 40.. again, 5 s a step) is measured on its own records
    resumed = metrics + [{"step": s, "time": 5000.0 + 5 * (s - 40)} for s in range(40, 44)]
    assert recent_pace(resumed, {"started_at": 4990.0})["s_per_step"] == 5.0
    assert recent_pace(resumed, {})["steps"] == 3

    # one step: the time since the run started is all there is; no times at all: no estimate
    assert recent_pace([{"step": 0, "time": 1030.0}], {"started_at": 1000.0})["s_per_step"] == 30.0
    assert recent_pace([{"step": 0, "time": 1030.0}], {}) is None
    assert recent_pace([{"step": 0, "reward/mean": 1.0}], {"started_at": 1000.0}) is None


def test_queue_legend_in_words_with_units():
    labels = {k: metric_label(k) for k in QUEUE_KEYS}
    assert labels["datastore/train/depth/trainer"] == "rows ready for the trainer, not taken yet (rows)"
    assert labels["datastore/train/unready/reward"] == "rows still waiting for their reward (rows)"
    assert labels["datastore/waiting_puts"] == "writes blocked: store full (calls)"
    assert metric_label("datastore/eval/in_flight/judge") == "rows judge took and has not released, partition eval (rows)"
    assert len(set(labels.values())) == len(labels)  # one legend entry per line
    for key, text in labels.items():
        assert "/" not in text and re.search(r"\((rows|calls)\)$", text), (key, text)
    assert metric_label("time/wait_batch_s") == "wait batch (s)"
    assert metric_label("reward/mean") == "reward/mean"  # a key without words is shown as it is


def test_reader_keeps_latest_reward_errors_with_messages(tmp_path):
    write_run(tmp_path, "errs", steps=6, versions=4, now=2000.0)  # 32 samples, 5 of them errors (i % 7 == 3)
    reader = RunReader(tmp_path)
    reader.refresh()
    snap = reader.snapshot()
    assert snap["errors_total"] == 5 and snap["name"] == "errs"
    assert [e["index"] for e in snap["errors"]] == [31, 24, 17, 10, 3]  # newest first
    assert snap["errors"][0] == {"error": "raised ValueError: no number in sample 31", "version": 3, "index": 31,
                                 "prompt": "31+3=", "response": "34"}
    assert snap["labels"]["datastore/train/depth/trainer"] == metric_label("datastore/train/depth/trainer")
    assert snap["pace"]["s_per_step"] == 2.0 and snap["pace"]["last_time"] == 2000.0


def test_server_overlays_several_runs(tmp_path):
    a = write_run(tmp_path / "a", "run-a", steps=4, versions=2)
    b = write_run(tmp_path / "b", "run-b", steps=6, versions=3, skill=0.5)
    server = DashboardServer([a, b], "127.0.0.1", 0, poll_s=0.2).start()
    try:
        stream = EventStream(server.url + "events")
        snaps = [stream.next() for _ in range(2)]
        assert [(n, d["run"], d["runs"], d["name"], len(d["metrics"])) for n, d in snaps] == \
            [("snapshot", 0, 2, "run-a", 4), ("snapshot", 1, 2, "run-b", 6)]
        write_lines(b / "metrics.jsonl", [{"step": 6, "reward/mean": 0.9}])
        server.poke()
        name, delta = stream.next()
        assert (name, delta["run"], [m["step"] for m in delta["metrics"]]) == ("delta", 1, [6])
        assert get_json(server.url + "api/snapshot?run=1")["name"] == "run-b"
        assert len(get_json(server.url + "api/samples?run=1&limit=1000")["rows"]) == 24
        assert len(get_json(server.url + "api/samples?limit=1000")["rows"]) == 16  # run 0 by default
    finally:
        server.stop()


def test_cli_exports_one_self_contained_html_file(tmp_path, capsys):
    a = write_run(tmp_path / "a", "run-a", steps=5)
    b = write_run(tmp_path / "b", "run-b", steps=3)
    (a / "metrics.jsonl").open("a").write(json.dumps({"step": 5, "note": "</script><b>"}) + "\n")
    out = tmp_path / "out" / "report.html"
    assert cli_main(["dashboard", str(a), str(b), "--export", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    page = out.read_text()
    markup = re.sub(r"<script>.*?</script>", "", page, flags=re.S)  # the page outside its inlined scripts
    assert "<style>" in markup and not re.search(r"(src|href)=\"(/|https?:)", markup)  # nothing to fetch
    assert page.count("</script>") == 3  # plotly, the data, app.js: none from the data's text
    assert "Plotly" in page and "window.STREAMRL_EXPORT = " in page and "streamrlDashboard" in page
    data = json.loads(page.split("window.STREAMRL_EXPORT = ", 1)[1].split(";</script>", 1)[0])
    assert [(r["name"], r["run"], r["runs"], len(r["metrics"])) for r in data["runs"]] == \
        [("run-a", 0, 2, 6), ("run-b", 1, 2, 3)]
    assert data["runs"][0]["metrics"][-1]["note"] == "</script><b>"
    assert [len(s["rows"]) for s in data["samples"]] == [40, 24]
    assert [r["name"] for r in export_data([a, b])["runs"]] == ["run-a", "run-b"]

    assert cli_main(["dashboard", str(tmp_path / "nope"), "--export", str(out)]) == 1
    assert "run directory not found" in capsys.readouterr().err


def test_a_browser_that_hangs_up_leaves_no_traceback(tmp_path):
    """Tabs closed and connections reset (a streaming one and a kept-alive one) are routine: the console of
    `streamrl dashboard` stays clean."""
    write_run(tmp_path, "hangup", steps=3)
    proc = subprocess.Popen([sys.executable, "-m", "rl.cli", "dashboard", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line)[1]) if "http://" in line else None
        assert port, f"`streamrl dashboard` printed {line!r}, not its URL"
        for path in ("/events", "/"):  # the stream, and a page fetch whose connection is kept alive after it
            conn = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert conn.recv(1024).startswith(b"HTTP/1.1 200")
            time.sleep(0.3)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            conn.close()
        write_lines(tmp_path / "metrics.jsonl", [{"step": 3, "reward/mean": 1.0}])  # the stream has news to write
        time.sleep(1.5)
        assert get_json(f"http://127.0.0.1:{port}/api/snapshot")["cursor"]["metrics"] == 4  # still serving
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err and "Exception" not in err, err
