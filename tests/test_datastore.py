"""The data store's put/get semantics on a real local Ray (one store for the module; a partition per test)."""

import asyncio
import re
import time

import pyarrow as pa
import pytest

from datastore.client import DataStore
from rl.core.waits import WaitTimeout

FIELDS = ["x", "y", "version"]


@pytest.fixture(scope="module")
def store(ray_session):
    s = DataStore.create(num_storage_units=2, tag_fields=["version"], declared_fields=FIELDS,
                         required_consumers=["r1", "r2"], timeout_s=60)
    yield s
    s.shutdown()


@pytest.fixture
def p(request):
    """A partition of its own for each test."""
    return re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]


def test_fields_arrive_separately_and_rows_wait_for_all(store, p):
    store.put(p, [0, 1, 2], {"x": [10, 11, 12], "version": [0, 0, 1]})
    assert store.poll("c", p, ["x", "y"], 3, min_n=1) is None  # y not ready yet
    store.put(p, [1], {"y": ["b"]})
    got = store.get("c", p, ["x", "y"], 1, timeout=5)
    assert got.to_pydict() == {"index": [1], "x": [11], "y": ["b"]}


def test_each_consumer_sees_each_row_once(store, p):
    store.put(p, list(range(6)), {"x": list(range(6))})
    a = store.get("a", p, ["x"], 4, timeout=5)["index"].to_pylist()
    b = store.get("a", p, ["x"], 2, timeout=5)["index"].to_pylist()
    assert sorted(a + b) == list(range(6)) and not set(a) & set(b)
    assert store.poll("a", p, ["x"], 1) is None
    assert store.get("other", p, ["x"], 6, timeout=5).num_rows == 6  # another consumer has its own view


def test_min_n_returns_what_is_ready(store, p):
    store.put(p, [0, 1], {"x": [0, 1]})
    got = store.get("c", p, ["x"], 10, min_n=1, timeout=5)
    assert got["index"].to_pylist() == [0, 1]


def test_groups_only_when_complete(store, p):
    store.put(p, [0, 1, 2, 4, 5], {"x": [0, 1, 2, 4, 5]})  # group 0 = 0..2 complete, group 1 = 3..5 not
    got = store.get("t", p, ["x"], 3, group_size=3, timeout=5)
    assert got["index"].to_pylist() == [0, 1, 2]
    assert store.poll("t", p, ["x"], 3, group_size=3) is None
    store.put(p, [3], {"x": [3]})
    assert store.get("t", p, ["x"], 3, group_size=3, timeout=5)["index"].to_pylist() == [3, 4, 5]


def test_where_filter_and_discard(store, p):
    store.put(p, [0, 1, 2, 3], {"x": [0, 1, 2, 3], "version": [0, 0, 2, 2]})
    dropped = store.discard("t", p, {"version": ("<", 1)}, group_size=2)
    assert dropped == [0, 1]
    got = store.get("t", p, ["x"], 2, group_size=2, where={"version": (">=", 1)}, timeout=5)
    assert got["index"].to_pylist() == [2, 3]


def test_take_then_fetch_in_shares_like_the_trainer(store, p):
    store.put(p, list(range(8)), {"x": list(range(8)), "y": [str(i) for i in range(8)]})
    take = store.take("trainer", p, ["x", "y"], 8, group_size=4, timeout=5)
    assert take.indexes == list(range(8)) and take.units == [i % 2 for i in range(8)]
    share = type(take)([take.indexes[k] for k in (4, 5, 6, 7)], [take.units[k] for k in (4, 5, 6, 7)])
    assert store.fetch(p, share, ["y"])["y"].to_pylist() == ["4", "5", "6", "7"]
    assert store.fetch(p, take, ["x"])["x"].to_pylist() == list(range(8))


def test_blocking_get_wakes_when_the_rows_arrive(store, p):
    async def main():
        waiter = asyncio.ensure_future(store.aget("c", p, ["x"], 2, timeout=20))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        t0 = time.monotonic()
        await store.aput(p, [0, 1], {"x": [5, 6]})
        got = await waiter
        return got["x"].to_pylist(), time.monotonic() - t0

    values, waited = asyncio.run(main())
    assert values == [5, 6] and waited < 5


def test_async_variants(store, p):
    async def main():
        await store.aput(p, [0, 1, 2], {"x": [1, 2, 3], "version": [4, 4, 4]})
        assert await store.apoll("c", p, ["x", "y"], 1) is None
        t = await store.atake("c", p, ["x"], 2, timeout=5)
        got = await store.afetch(p, t, ["x", "version"])
        await store.arelease("c", t)
        rest = await store.aget("c", p, ["x"], 1, timeout=5)
        dropped = await store.adiscard("d", p, {"version": ("==", 4)})
        return got.to_pydict(), rest["index"].to_pylist(), dropped, await store.astats()

    got, rest, dropped, stats = asyncio.run(main())
    assert got == {"index": [0, 1], "x": [1, 2], "version": [4, 4]} and rest == [2] and dropped == [0, 1, 2]
    assert stats["partitions"][p]["consumers"]["c"]["rows_taken"] == 3


def test_timeout_names_what_was_awaited(store, p):
    store.put(p, [0], {"x": [0]})
    with pytest.raises(WaitTimeout) as e:
        store.get("trainer", p, ["x", "y"], 4, timeout=0.5)
    msg = str(e.value)
    assert "0.5" in msg and "trainer" in msg and "'y'" in msg and f"'{p}'" in msg and "ready per field" in msg


def test_get_of_field_nobody_writes_is_an_error(store, p):
    with pytest.raises(KeyError, match="no producer writes"):
        store.get("c", p, ["nonexistent"], 1, timeout=5)


def test_bad_calls_raise_plain_clear_errors(store, p):
    with pytest.raises(KeyError, match=r"put of field\(s\) \['z'\].*not declared"):
        store.put(p, [0], {"z": [1]})
    store.put(p, [0], {"x": [1]})  # x is an int64 from now on, on every unit
    with pytest.raises(TypeError, match="'x' of partition .* holds int64; this put gives string") as e:
        store.put(p, [1], {"x": ["one"]})  # row 1 lives on the other unit: the controller keeps the types
    assert type(e.value) is TypeError  # Ray's RayTaskError wrapper is gone
    with pytest.raises(TypeError, match="cannot be made into Arrow arrays"):
        store.put(p, [2], {"x": [object()]})
    with pytest.raises(ValueError, match="2 indexes with 1 rows"):
        store.put(p, [0, 1], {"x": [1]})
    with pytest.raises(ValueError, match="same row twice"):
        store.put(p, [3, 3], {"x": [1, 2]})
    with pytest.raises(ValueError, match="non-negative ints"):
        store.put(p, [-1], {"x": [1]})
    with pytest.raises(TypeError, match="list of field names"):
        store.get("c", p, "x", 1, timeout=1)
    with pytest.raises(ValueError, match="unknown operator"):
        store.get("c", p, ["x"], 1, where={"version": ("=>", 1)}, timeout=1)
    with pytest.raises(KeyError, match="not a tag field"):
        store.get("c", p, ["x"], 1, where={"step": (">=", 1)}, timeout=1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        store.get("c", p, ["x"], 5, group_size=2, timeout=1)
    with pytest.raises(ValueError, match="partition must be a name"):
        store.put("a/b", [0], {"x": [1]})


def test_payload_types_round_trip(store, p):
    store.put(p, [0, 1], {"x": [[1, 2, 3], [4]], "y": [[0.5, -1.0, 2.0], [3.0]]})
    got = store.get("c", p, ["x", "y"], 2, timeout=5).to_pydict()
    assert got["x"] == [[1, 2, 3], [4]] and got["y"] == [[0.5, -1.0, 2.0], [3.0]]
    store.put(p, [2], pa.table({"x": pa.array([[7]], pa.list_(pa.int64()))}))  # an Arrow table works too


def test_empty_lists_take_the_field_type(store, p):
    """A put whose list values are all empty (Arrow infers list<null>: a rollout whose prompt filled the
    context) is stored, before or after the field's type is known, and reads back with that type."""
    store.put(p, [0, 1], {"x": [[], []]})  # same unit count as rows: both units see list<null> first
    store.put(p, [2, 3], {"x": [[5, 6], [7]]})
    store.put(p, [4], {"x": [[]]})
    got = store.get("c", p, ["x"], 5, timeout=5)
    assert got.schema.field("x").type == pa.list_(pa.int64())
    assert dict(zip(got.column("index").to_pylist(), got.column("x").to_pylist())) == {
        0: [], 1: [], 2: [5, 6], 3: [7], 4: []}


def test_rows_done_by_every_required_consumer_are_evicted(store, p):
    n = 10
    store.put(p, list(range(n)), {"x": list(range(n)), "y": ["v" * 1000] * n, "version": [0] * n})
    before = store.stats()
    assert before["partitions"][p]["rows"] == n and before["partitions"][p]["bytes"] > 10_000
    store.get("r1", p, ["x"], n, timeout=5)  # get = take + fetch + release
    t = store.take("r2", p, ["y"], 4, timeout=5)
    store.fetch(p, t, ["y"])
    assert store.stats()["partitions"][p]["rows"] == n  # r2 took only 4 and still holds them
    store.release("r2")
    store.discard("r2", p, {"version": ("==", 0)})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = store.stats()
        if s["partitions"][p]["rows"] == 0 and s["unit_bytes_held"] < before["unit_bytes_held"]:
            break
        time.sleep(0.05)
    ps = s["partitions"][p]
    assert ps["rows"] == 0 and ps["evicted"] == n and ps["bytes"] == 0
    assert s["unit_bytes_held"] < before["unit_bytes_held"]
    with pytest.raises(ValueError, match="evicted; a late write is refused"):
        store.put(p, [3], {"y": ["late"]})


def test_stats_and_metrics_for_the_dashboard(store, p):
    store.put(p, [0, 1, 2], {"x": [0, 1, 2], "version": [1, 1, 1]})
    store.get("m", p, ["x"], 2, timeout=5)
    s = store.stats()
    ps = s["partitions"][p]
    assert ps["ready"]["x"] == 3 and ps["unready"]["y"] == 3 and ps["consumers"]["m"]["untaken"] == 1
    assert s["put"]["rows"] >= 3 and s["get"]["rows"] >= 2 and s["get"]["bytes"] > 0
    assert s["put"]["window_rows_per_s"] > 0 and len(s["units"]) == 2 and s["dead_units"] == []
    m = store.metrics(s)
    assert m[f"datastore/{p}/untaken/m"] == 1.0 and m[f"datastore/{p}/unready/y"] == 3.0
    assert all(isinstance(v, float) for v in m.values()) and "datastore/get_mb_per_s" in m
    assert store.health() == {"controller": True, "unit0": True, "unit1": True}
