"""Durability on a real local Ray: finished rows and the trainer's takes are logged; after a crash (actors
killed, no clean close) a store created on the same log recovers every finished row, and the trainer
never gets a row twice across the restart. A storage unit killed mid-run is reported by name."""

import time

import pyarrow as pa

import pytest
import ray

from datastore import log as dlog
from datastore.client import DataStore
from datastore.errors import StoreActorDied
from rl.core.waits import PeerDied

FIELDS = ["x", "version", "r"]
KW = dict(tag_fields=["version"], declared_fields=FIELDS, required_consumers=["reward", "trainer"], timeout_s=30)


def crash(store):
    """What a dead driver or node leaves: the actors die without closing their files."""
    for actor in [store.controller, *store.units]:
        ray.kill(actor, no_restart=True)


def score(store, n):
    """The reward worker's loop, once: take rows with x, write r."""
    take = store.take("reward", "train", ["x"], n, min_n=1, timeout=5)
    xs = store.fetch("train", take, ["x"])["x"].to_pylist()
    store.put("train", take.indexes, {"r": [x / 10 for x in xs]})
    return take.indexes


def test_restart_recovers_finished_rows_and_the_trainer_never_gets_one_twice(ray_session, tmp_path):
    log_dir = tmp_path / "datastore"
    a = DataStore.create(2, log_dir=log_dir, **KW)
    a.put("train", list(range(20)), {"x": list(range(20)), "version": [0] * 20})
    assert score(a, 12) == list(range(12))  # rows 0..11 finished (and logged); 12..19 are not
    first = a.get("trainer", "train", ["x", "r"], 4, group_size=2, timeout=5)["index"].to_pylist()
    claimed = a.take("trainer", "train", ["x", "r"], 4, group_size=2, timeout=5).indexes  # then the crash
    assert first == [0, 1, 2, 3] and claimed == [4, 5, 6, 7]
    crash(a)

    b = DataStore.create(1, log_dir=log_dir, **KW)  # also fewer units than before
    try:
        assert b.recovered == {"train": {"rows_in_log": 12, "replayed": 4, "evicted": 8, "next_index": 12}}
        again = b.get("trainer", "train", ["x", "r"], 8, min_n=1, group_size=2, timeout=5).to_pydict()
        assert again["index"] == [8, 9, 10, 11] and again["r"] == [0.8, 0.9, 1.0, 1.1]
        assert not set(again["index"]) & set(first + claimed)  # never twice across the restart
        assert b.poll("reward", "train", ["x"], 20) is None  # the reward worker had scored them all
        with pytest.raises(ValueError, match="evicted; a late write is refused"):
            b.put("train", [5], {"r": [0.0]})
        b.put("train", [12, 13], {"x": [12, 13], "version": [1, 1], "r": [1.2, 1.3]})  # new rows log on
    finally:
        b.shutdown()
    # the log is the rollout dump: every finished row once, readable with plain pyarrow
    dump = dlog.read_rows(log_dir, "train")
    assert dump["index"].to_pylist() == list(range(14)) and dump["x"].to_pylist() == list(range(14))
    seg = dlog.segments(log_dir, "train")[0]
    assert pa.ipc.open_stream(pa.OSFile(str(seg))).read_all().column_names == ["index", *FIELDS, dlog.LOGGED_AT]


def wait_dead(actor, timeout_s: float = 30.0) -> None:
    """Until calls to `actor` fail (it is dead), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return
        time.sleep(0.1)
    raise AssertionError(f"actor still answers {timeout_s} s after ray.kill")


def test_a_killed_storage_unit_is_named_and_a_restart_recovers_its_rows(ray_session, tmp_path):
    log_dir = tmp_path / "datastore"
    a = DataStore.create(2, log_dir=log_dir, **KW)
    a.put("train", list(range(8)), {"x": list(range(8)), "version": [3] * 8, "r": [0.5] * 8})
    take = a.take("trainer", "train", ["x"], 2, timeout=5)
    ray.kill(a.units[1], no_restart=True)
    wait_dead(a.units[1])  # ray.kill returns before the actor is gone: a fetch right after could still reach it
    with pytest.raises(StoreActorDied, match=r"(?s)storage unit 1 \(of 2\) died .*DataStore.create\(\.\.\., log_dir"):
        a.fetch("train", take, ["x"], timeout=10)
    with pytest.raises(StoreActorDied, match=r"storage unit 1 \(of 2\)"):
        a.put("train", [9], {"x": [9]}, timeout=5)
    s = a.stats()
    assert s["dead_units"] == [1] and a.health() == {"controller": True, "unit0": True, "unit1": False}
    a.shutdown()

    b = DataStore.create(2, log_dir=log_dir, **KW)
    try:
        assert b.recovered["train"]["rows_in_log"] == 8  # unit 1's rows were in its log segment
        got = b.get("trainer", "train", ["x", "r"], 8, min_n=1, timeout=5)["index"].to_pylist()
        assert got == [2, 3, 4, 5, 6, 7]  # 0 and 1 were the trainer's before the crash
    finally:
        b.shutdown()


def test_a_dead_controller_is_named(ray_session):
    s = DataStore.create(1, **KW)
    try:
        ray.kill(s.controller, no_restart=True)
        with pytest.raises(StoreActorDied, match="data store controller"):
            s.get("trainer", "train", ["x"], 1, timeout=2)
        with pytest.raises(PeerDied, match="(?s)data store controller died .*storage unit 0"):
            s.put("train", [0], {"x": [0]}, timeout=5)  # the unit cannot report the rows
    finally:
        s.shutdown()
