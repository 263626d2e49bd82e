"""Each metrics sink writes records its own tool reads back: TensorBoard (EventAccumulator), W&B offline (the
run's .wandb file decoded with wandb's own record protobuf), MLflow (MlflowClient on the file store)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from rl.core.config import load_recipe, to_yaml
from rl.metrics import MetricsLogger
from rl.sinks import scalars

RECORDS = [
    {"reward/mean": 0.25, "actor/kl_behaviour": 0.01, "staleness/hist": {"0": 6, "1": 2}, "note": "text"},
    {"reward/mean": 0.5, "actor/kl_behaviour": float("nan"), "staleness/hist": {"1": 8}},
    {"reward/mean": 0.75, "actor/kl_behaviour": 0.03, "datastore/train/depth/trainer": 4.0},
]


def run_with(tmp_path: Path, *overrides: str) -> Path:
    """Three steps through MetricsLogger with the given logging keys; the run dir has its config.yaml."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(None, ["logging.progress=false", "logging.dashboard=false", "logging.name=sinktest",
                                "trainer.lr=0.0005", *overrides])
    (tmp_path / "config.yaml").write_text(to_yaml(recipe))
    ml = MetricsLogger(tmp_path, recipe.logging, total_steps=len(RECORDS))
    for step, rec in enumerate(RECORDS):
        ml.log(step, rec)
    ml.close()
    return tmp_path


def test_scalars_flattens_and_drops_what_trackers_cannot_take():
    assert scalars({"step": 3, "time": 1.0, **RECORDS[0]}) == {
        "reward/mean": 0.25, "actor/kl_behaviour": 0.01, "staleness/hist/0": 6.0, "staleness/hist/1": 2.0}
    assert "actor/kl_behaviour" not in scalars(RECORDS[1])


def test_tensorboard_sink_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_with(tmp_path, "logging.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("reward/mean")] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [e.step for e in acc.Scalars("actor/kl_behaviour")] == [0, 2]  # the NaN step is left out
    assert [e.value for e in acc.Scalars("staleness/hist/1")] == [2.0, 8.0]
    assert "datastore/train/depth/trainer" in tags["scalars"]
    assert any(t.startswith("recipe") for t in tags["tensors"])  # the recipe as a text summary


def read_wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-log framing
    (32 KiB blocks; each chunk has crc32c(4) + length(2) + type(1): 1 full, 2 first, 3 middle, 4 last)
    around protobuf `Record`s of wandb's own schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, chunk, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the rest of a block too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        chunk = payload if kind in (1, 2) else chunk + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
    return out


def test_wandb_offline_sink_round_trip(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the recipe leaves the mode empty: offline
    run_with(tmp_path, "logging.wandb=true", "logging.wandb_project=streamrl-test")
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"one offline run file under {tmp_path / 'wandb'}, found {files}"
    records = read_wandb_records(files[0])
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [0, 1, 2]
    assert [h["reward/mean"] for h in history] == [0.25, 0.5, 0.75]
    assert history[0]["staleness/hist/0"] == 6 and "actor/kl_behaviour" not in history[1]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "streamrl-test" and run.display_name == "sinktest"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["trainer.lr"] == 0.0005 and config["trainer.total_steps"] == 300  # values keep their types
    assert config["logging.wandb"] is True and config["model.path"] is None
    exit_record = next(r.exit for r in records if r.WhichOneof("record_type") == "exit")
    assert exit_record.exit_code == 0


def test_wandb_mode_comes_from_the_recipe_else_from_wandb_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B's own variable: no run files at all
    run_with(tmp_path / "env", "logging.wandb=true")
    assert not list((tmp_path / "env").glob("wandb/*run-*"))
    run_with(tmp_path / "recipe", "logging.wandb=true", "logging.wandb_mode=offline")  # the recipe's key wins
    assert len(list((tmp_path / "recipe").glob("wandb/offline-run-*/run-*.wandb"))) == 1


def test_mlflow_file_store_sink_round_trip(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the sink opts in to the file store itself
    run_with(tmp_path, "logging.mlflow=true", "logging.mlflow_experiment=streamrl-test")
    assert (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("streamrl-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "sinktest" and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean"))
    assert history == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "actor/kl_behaviour")] == [0, 2]
    assert run.data.metrics["staleness/hist/1"] == 8.0
    assert run.data.params["trainer.lr"] == "0.0005" and run.data.params["logging.mlflow"] == "True"


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch):
    """A tracker that raises mid-run is reported and dropped; metrics.jsonl keeps every step."""
    from rl import sinks

    monkeypatch.setattr(sinks.TensorBoardSink, "log", lambda self, step, record: 1 / 0)
    run_with(tmp_path, "logging.tensorboard=true")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(RECORDS)


def test_a_stalled_tracker_never_holds_the_run(tmp_path, monkeypatch, caplog):
    """A tracker whose log() never returns (a hung network call): logging returns at once, the run's end
    waits at most the close timeout, the stall is reported once, and metrics.jsonl has every step."""
    import threading
    import time

    from rl import sinks

    stalled, release = threading.Event(), threading.Event()

    def hang(self, step, record):
        stalled.set()
        release.wait()  # "forever": until the test ends

    monkeypatch.setattr(sinks.TensorBoardSink, "log", hang)
    monkeypatch.setattr(sinks, "TRACKER_QUEUE", 2)
    monkeypatch.setattr(sinks, "TRACKER_CLOSE_TIMEOUT_S", 1.0)
    recipe = load_recipe(None, ["logging.progress=false", "logging.dashboard=false", "logging.tensorboard=true"])
    ml = MetricsLogger(tmp_path, recipe.logging, total_steps=20)
    t0 = time.monotonic()
    try:
        for step in range(20):
            ml.log(step, {"reward/mean": step / 20})
        logged = time.monotonic() - t0
        ml.close()
    finally:
        release.set()
    assert stalled.is_set() and logged < 1.0, logged  # the tracker got a record and hung; logging did not wait
    assert time.monotonic() - t0 < 5.0  # the close gave up after its timeout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 20
    warnings = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len([w for w in warnings if "records behind" in w]) == 1, warnings  # reported once, not per step
    assert any("did not flush and finish within 1 s" in w for w in warnings), warnings


def test_a_missing_tracker_package_is_named_with_its_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"logging.wandb.*streamrl\[trackers\]"):
        run_with(tmp_path, "logging.wandb=true")
