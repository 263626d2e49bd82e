"""Back-pressure on a real local Ray: a full store makes producers wait, and they resume when consumers
free room; after the timeout the error names the capacity and what holds it."""

import threading
import time

import pytest

from datastore.client import DataStore
from datastore.errors import StoreFull
from rl.core.waits import WaitTimeout


@pytest.fixture(scope="module")
def store(ray_session):
    # 8 rows / 64 KiB in all, 4 rows / 32 KiB per unit; the trainer is the one consumer rows wait for
    s = DataStore.create(num_storage_units=2, declared_fields=["x", "blob"], finished_fields=["x"],
                         required_consumers=["trainer"], capacity_rows=8, capacity_bytes=64 * 1024, timeout_s=30,
                         lease_s=2.0)
    yield s
    s.shutdown()


def held(store, partition):
    return store.stats()["partitions"].get(partition, {}).get("rows", 0)


def test_a_full_store_blocks_a_put_until_a_consumer_frees_room(store):
    store.put("a", list(range(8)), {"x": list(range(8))})
    done = threading.Event()
    errors = []

    def producer():
        try:
            store.put("a", [8, 9], {"x": [8, 9]}, timeout=20)
        except Exception as exc:
            errors.append(exc)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(1.0)
    assert not done.is_set(), "the put should wait: the store is full"
    assert store.stats()["waiting_puts"] >= 1
    store.put("a", [0, 1], {"blob": [b"b", b"b"]})  # more fields for held rows never wait
    store.get("trainer", "a", ["x"], 4, timeout=5)  # get = take + fetch + release: rows 0..3 are evicted
    assert done.wait(10) and not errors, errors
    t.join(5)
    got = store.get("trainer", "a", ["x"], 6, timeout=5)["index"].to_pylist()
    assert got == [4, 5, 6, 7, 8, 9]


def test_the_timeout_error_names_the_capacity_and_what_holds_it(store):
    store.put("b", list(range(8)), {"x": list(range(8))})
    t0 = time.monotonic()
    with pytest.raises(StoreFull) as e:
        store.put("b", [8], {"x": [8]}, timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 10 and isinstance(e.value, WaitTimeout)
    msg = str(e.value)
    assert "0.5 s" in msg and "storage unit 0" in msg and "capacity is 4 rows" in msg
    assert "8 not yet taken by 'trainer'" in msg and "partition 'b'" in msg
    store.discard("trainer", "b", {})  # nobody will train on them: they go, and the store has room again
    store.put("b", [8], {"x": [8]}, timeout=5)


def test_bytes_bound_and_puts_that_can_never_fit(store):
    with pytest.raises(ValueError, match="can never fit its share of the capacity \\(4 rows\\)"):
        store.put("c", list(range(0, 10, 2)), {"x": [0] * 5})  # 5 new rows for unit 0 alone
    with pytest.raises(ValueError, match="can never fit .*32768 bytes"):
        store.put("c", [0], {"x": [0], "blob": [b"z" * 40_000]})
    store.put("c", [0], {"x": [0], "blob": [b"z" * 20_000]})
    with pytest.raises(StoreFull, match="bytes"):
        store.put("c", [2], {"x": [2], "blob": [b"z" * 20_000]}, timeout=0.3)  # unit 0 is at 20 of 32 KiB
    store.get("trainer", "c", ["x"], 1, timeout=5)
    store.put("c", [2], {"x": [2], "blob": [b"z" * 20_000]}, timeout=10)


def test_rows_of_a_consumer_that_never_comes_back_are_freed_when_its_lease_expires(store):
    for p in store.stats()["partitions"]:
        store.discard("trainer", p, None)  # what earlier tests left
    store.put("d", list(range(8)), {"x": list(range(8))})
    take = store.take("trainer", "d", ["x"], 8, timeout=5)  # and then this taker "dies": no release, no next take
    assert take.indexes == list(range(8))
    t0 = time.monotonic()
    store.put("d", [8], {"x": [8]}, timeout=20)  # waits for the lease (2 s) to run out
    assert 1.0 < time.monotonic() - t0 < 15
    assert store.held("d") == [8]
