"""The data store's put/get semantics on a real local Ray."""

import pytest

from datastore.client import DataStore
from rl.waits import WaitTimeout


@pytest.fixture
def store(ray_session):
    s = DataStore.create(num_storage_units=2, tag_fields=["version"], declared_fields=["x", "y", "version"])
    yield s
    s.shutdown()


def test_fields_arrive_separately_and_rows_wait_for_all(store):
    store.put("p", [0, 1, 2], {"x": [10, 11, 12], "version": [0, 0, 1]})
    assert store.poll("c", "p", ["x", "y"], 3, min_n=1) is None  # y not ready yet
    store.put("p", [1], {"y": ["b"]})
    got = store.get("c", "p", ["x", "y"], 1, timeout=5)
    assert got.to_pydict() == {"index": [1], "x": [11], "y": ["b"]}


def test_each_consumer_sees_each_row_once(store):
    store.put("p", list(range(6)), {"x": list(range(6))})
    a = store.get("a", "p", ["x"], 4, timeout=5)["index"].to_pylist()
    b = store.get("a", "p", ["x"], 2, timeout=5)["index"].to_pylist()
    assert sorted(a + b) == list(range(6)) and not set(a) & set(b)
    assert store.poll("a", "p", ["x"], 1) is None
    assert store.get("other", "p", ["x"], 6, timeout=5).num_rows == 6  # another consumer has its own view


def test_min_n_returns_what_is_ready(store):
    store.put("p", [0, 1], {"x": [0, 1]})
    got = store.get("c", "p", ["x"], 10, min_n=1, timeout=5)
    assert got["index"].to_pylist() == [0, 1]


def test_groups_only_when_complete(store):
    store.put("p", [0, 1, 2, 4, 5], {"x": [0, 1, 2, 4, 5]})  # group 0 = 0..2 complete, group 1 = 3..5 not
    got = store.get("t", "p", ["x"], 3, group_size=3, timeout=5)
    assert got["index"].to_pylist() == [0, 1, 2]
    assert store.poll("t", "p", ["x"], 3, group_size=3) is None
    store.put("p", [3], {"x": [3]})
    assert store.get("t", "p", ["x"], 3, group_size=3, timeout=5)["index"].to_pylist() == [3, 4, 5]


def test_where_filter_and_discard(store):
    store.put("p", [0, 1, 2, 3], {"x": [0, 1, 2, 3], "version": [0, 0, 2, 2]})
    dropped = store.discard("t", "p", {"version": ("<", 1)}, group_size=2)
    assert dropped == [0, 1]
    got = store.get("t", "p", ["x"], 2, group_size=2, where={"version": (">=", 1)}, timeout=5)
    assert got["index"].to_pylist() == [2, 3]


def test_timeout_names_what_was_awaited(store):
    store.put("p", [0], {"x": [0]})
    with pytest.raises(WaitTimeout) as e:
        store.get("trainer", "p", ["x", "y"], 4, timeout=0.5)
    msg = str(e.value)
    assert "0.5" in msg and "trainer" in msg and "'y'" in msg and "'p'" in msg and "ready per field" in msg


def test_get_of_field_nobody_writes_is_an_error(store):
    with pytest.raises(KeyError, match="no producer writes"):
        store.get("c", "p", ["nonexistent"], 1, timeout=5)


def test_payload_types_round_trip(store):
    store.put("p", [0, 1], {"x": [[1, 2, 3], [4]], "y": [[0.5, -1.0, 2.0], [3.0]]})
    got = store.get("c", "p", ["x", "y"], 2, timeout=5).to_pydict()
    assert got["x"] == [[1, 2, 3], [4]] and got["y"] == [[0.5, -1.0, 2.0], [3.0]]


def test_put_shape_mismatch(store):
    with pytest.raises(ValueError, match="2 indexes with 1 rows"):
        store.put("p", [0, 1], {"x": [1]})
