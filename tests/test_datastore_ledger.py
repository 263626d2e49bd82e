"""The store's bookkeeping without Ray: readiness, once-per-consumer, groups, filters, leases, eviction,
recovery, and the rate meter. Each rule is checked against hand-worked expectations."""

import pytest

from datastore.ledger import IndexSet, Ledger
from datastore.stats import RateMeter, merge

FIELDS = ["x", "r", "version"]


def ledger(**kw):
    kw.setdefault("required", ["reward", "trainer"])
    kw.setdefault("finished_fields", FIELDS)
    return Ledger(declared=FIELDS, tag_fields=["version"], **kw)


def put(led, idxs, fields, version=None, unit=0, nbytes=0):
    tags = {"version": [version] * len(idxs)} if version is not None else {}
    return led.mark_ready("p", list(idxs), fields, unit, tags, nbytes)


def take(led, consumer, fields, n, min_n=1, group_size=None, where=None, owner=None, now=0.0):
    return led.try_take("p", consumer, fields, n, min_n, group_size, where, owner or consumer, now)


def test_rows_wait_for_every_asked_field_and_go_once_per_consumer():
    led = ledger()
    put(led, range(4), ["x", "version"], version=0)
    assert take(led, "trainer", ["x", "r"], 4) is None  # r not written yet
    put(led, [2, 0], ["r"])
    t = take(led, "trainer", ["x", "r"], 4)
    assert t.indexes == [0, 2] and t.units == [0, 0] and t.consumer == "trainer"
    assert take(led, "trainer", ["x", "r"], 4) is None  # each row once
    assert take(led, "reward", ["x"], 10).indexes == [0, 1, 2, 3]  # another consumer has its own view
    assert led.counts("p", "trainer") == {"rows": 4, "ready": {"x": 4, "version": 4, "r": 2}, "untaken": 2}


def test_min_n_and_oldest_first():
    led = ledger()
    put(led, [5, 3, 9], ["x"])
    assert take(led, "c", ["x"], 3, min_n=4) is None
    assert take(led, "c", ["x"], 2).indexes == [3, 5]
    assert take(led, "c", ["x"], 2).indexes == [9]


def test_whole_groups_only_and_n_caps_the_groups():
    led = ledger()
    put(led, [0, 1, 2, 4, 5, 6, 7, 8], ["x"])  # groups of 3: 0 complete, 1 missing 3, 2 complete
    t = take(led, "t", ["x"], 6, group_size=3)
    assert t.indexes == [0, 1, 2, 6, 7, 8]
    put(led, [3, 9, 10, 11], ["x"])
    assert take(led, "t", ["x"], 3, group_size=3).indexes == [3, 4, 5]  # n=3 caps at one group
    assert take(led, "t", ["x"], 3, group_size=3).indexes == [9, 10, 11]


def test_where_filters_and_discard_takes_whole_groups():
    led = ledger()
    put(led, [0, 1], ["x"], version=0)
    put(led, [2, 3], ["x"], version=2)
    put(led, [4], ["x"], version=0)  # group 2 (of size 2) half stale, half not yet written
    hit, _ = led.discard("p", "t", {"version": ("<", 1)}, group_size=2)
    assert hit == [0, 1, 4]
    assert take(led, "t", ["x"], 4, group_size=2, where={"version": (">=", 1)}).indexes == [2, 3]
    put(led, [5], ["x"], version=3)
    assert take(led, "t", ["x"], 2, group_size=2) is None  # 4 was discarded, so group 2 never completes for t
    assert take(led, "other", ["x"], 10, where={"version": ("==", 0)}).indexes == [0, 1, 4]


def test_generation_moves_only_when_a_row_could_become_takeable():
    led = ledger()
    put(led, [0], ["x"])
    assert take(led, "t", ["x", "r"], 1) is None
    g = led.generation("p", "t", ["x", "r"])
    put(led, [1], ["x"])  # still lacks r: a waiting take need not retry
    assert led.generation("p", "t", ["x", "r"]) == g
    put(led, [0], ["r"])
    assert led.generation("p", "t", ["x", "r"]) != g


def test_eviction_needs_every_required_consumer_a_finished_row_and_no_lease():
    led = ledger()
    put(led, range(4), ["x", "version"], version=0, nbytes=400)
    take(led, "reward", ["x"], 4, owner="rw")
    _, ev = put(led, range(4), ["r"], nbytes=40)
    assert ev == []  # trainer has not had them
    t = take(led, "trainer", FIELDS, 2, owner="tr")
    assert t.indexes == [0, 1]
    assert led.release_owner("tr") == []  # the reward worker's lease still holds them
    assert sorted(led.release_owner("rw")) == [("p", 0, 0), ("p", 0, 1)]
    assert led.counts("p")["rows"] == 2 and led.parts["p"].nbytes == pytest.approx(220)
    refused, _ = put(led, [0], ["r"])  # a late write to an evicted row
    assert refused == [0] and led.counts("p")["rows"] == 2


def test_a_row_discarded_before_it_finished_is_evicted_when_its_producer_finishes_it():
    led = ledger()
    put(led, [0, 1], ["x", "version"], version=0)
    hit, ev = led.discard("p", "trainer", {"version": ("<", 1)})
    assert hit == [0, 1] and ev == []  # reward has not scored them
    take(led, "reward", ["x"], 2, owner="rw")
    put(led, [0, 1], ["r"])  # the reward worker still holds its lease
    assert led.counts("p")["rows"] == 2
    assert len(led.release_owner("rw")) == 2 and led.counts("p")["rows"] == 0


def test_no_required_consumers_means_no_eviction():
    led = ledger(required=[])
    put(led, [0], FIELDS)
    take(led, "a", ["x"], 1)
    assert led.release_owner("a") == [] and led.counts("p")["rows"] == 1


def test_a_take_releases_only_the_same_owners_earlier_takes_and_leases_expire():
    led = ledger(required=["t"], lease_s=10.0)
    put(led, range(6), FIELDS)
    take(led, "t", ["x"], 2, owner="t@A", now=0.0)
    take(led, "t", ["x"], 2, owner="t@B", now=1.0)
    assert led.release_owner("t@C") == []
    assert [e[2] for e in led.release_owner("t@A")] == [0, 1]
    assert led.next_deadline() == 11.0
    assert led.expire(10.5) == []
    assert [e[2] for e in led.expire(11.0)] == [2, 3]
    t = take(led, "t", ["x"], 2, owner="t@A", now=20.0)
    assert [e[2] for e in led.release_take(t.take_id)] == [4, 5] and led.counts("p")["rows"] == 0
    assert led.release_take(t.take_id) == []  # releasing twice is harmless


def test_restore_brings_back_consumption_and_evicted_rows():
    led = ledger()
    put(led, [2, 3, 4], FIELDS)  # replayed from the log; 0, 1 were evicted before the restart
    ev = led.restore("p", {"trainer": [2, 0], "reward": [2, 3]}, IndexSet([0, 1]))
    assert ev == [("p", 0, 2)]  # 2 was taken by both before the crash
    assert take(led, "trainer", ["x"], 5).indexes == [3, 4]
    assert take(led, "reward", ["x"], 5).indexes == [4]
    assert put(led, [1], ["x"])[0] == [1]  # refused: evicted before the restart


def test_bad_takes_and_types_are_clear_errors():
    led = ledger()
    with pytest.raises(KeyError, match="no producer writes"):
        led.check_take("p", ["x", "nope"], None)
    with pytest.raises(KeyError, match="not a tag field"):
        led.check_take("p", ["x"], {"step": (">=", 1)})
    with pytest.raises(ValueError, match="unknown operator"):
        led.check_take("p", ["x"], {"version": ("=>", 1)})
    assert led.register_types("p", {"x": "int64"}) == {"x": "int64"}
    with pytest.raises(TypeError, match="'x' of partition 'p' holds int64; this put gives string"):
        led.register_types("p", {"x": "string"})


def test_stats_count_ready_unready_depth_and_in_flight():
    led = ledger()
    put(led, range(5), ["x", "version"], version=1, nbytes=500)
    put(led, [0, 1], ["r"])
    take(led, "trainer", FIELDS, 1, owner="trainer@1")
    s = led.partition_stats("p")
    assert s["rows"] == 5 and s["bytes"] == 500 and s["finished"] == 2
    assert s["ready"] == {"r": 2, "version": 5, "x": 5} and s["unready"] == {"r": 3, "version": 0, "x": 0}
    t = s["consumers"]["trainer"]
    assert t["untaken"] == 4 and t["depth"] == 1 and t["in_flight"] == 1 and t["rows_taken"] == 1
    assert "3 of them ready" not in led.holders() and "4 not yet taken by 'trainer'" in led.holders()


def test_index_set_keeps_a_low_water_mark():
    s = IndexSet([3, 1, 0])
    assert s.low == 2 and s.above == {3} and 1 in s and 2 not in s and len(s) == 3
    s.add(2)
    assert s.low == 4 and not s.above and list(s) == [0, 1, 2, 3]
    t = IndexSet([9])
    t.merge(s)
    assert list(t) == [0, 1, 2, 3, 9]


def test_rate_meter_since_start_and_over_the_window():
    m = RateMeter(window_s=10, now=0.0)
    m.add(100, 1000, now=1.0)
    m.add(100, 1000, now=15.0)
    s = m.snapshot(now=20.0)
    assert s["rows"] == 200 and s["rows_per_s"] == pytest.approx(10.0)
    assert s["window_rows_per_s"] == pytest.approx(10.0) and s["window_bytes_per_s"] == pytest.approx(100.0)
    both = merge([s, s])
    assert both["rows"] == 400 and both["window_s"] == 10


def test_discard_of_given_indexes_and_held_rows():
    led = ledger(required=["trainer"])
    put(led, [0, 1, 2, 3, 5], FIELDS, version=0)  # group 2 (4, 5) can never complete
    held = led.held("p", "trainer")
    incomplete = [i for i in held if sum(1 for j in held if j // 2 == i // 2) < 2]
    hit, ev = led.discard("p", "trainer", None, indexes=incomplete + [99])
    assert hit == [5] and ev == [("p", 0, 5)] and led.held("p") == [0, 1, 2, 3]
    take(led, "trainer", ["x"], 2)
    assert led.held("p", "trainer") == [2, 3]
