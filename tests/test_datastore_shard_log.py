"""A storage unit's shard and the durable log, without Ray: real Arrow batches, real files."""

import json

import pyarrow as pa
import pytest

from datastore import log as dlog
from datastore.storage import COMPACT_MIN_BYTES, INDEX, Shard


def batch(idxs, **cols):
    return pa.RecordBatch.from_pydict({INDEX: pa.array(idxs, pa.int64()), **cols})


def test_get_assembles_fields_from_several_batches_in_the_order_asked():
    s = Shard()
    s.put("p", batch([0, 1, 2], x=[10, 11, 12], y=["a", "b", "c"]))
    s.put("p", batch([3, 4], x=[13, 14], y=["d", "e"]))
    s.put("p", batch([1], y=["B"]))  # overwrite one field of one row
    got = s.get("p", [4, 1, 0, 3], ["x", "y"])
    assert got.to_pydict() == {INDEX: [4, 1, 0, 3], "x": [14, 11, 10, 13], "y": ["e", "B", "a", "d"]}


def test_missing_field_or_row_names_them():
    s = Shard()
    s.put("p", batch([0], x=[1]))
    with pytest.raises(KeyError, match="'y' is not held"):
        s.get("p", [0], ["y"])
    with pytest.raises(KeyError, match=r"missing for rows \[7\]"):
        s.get("p", [0, 7], ["x"])


def test_type_checks_and_late_writes():
    s = Shard()
    s.put("p", batch([0], x=pa.array([1], pa.int64())))
    with pytest.raises(TypeError, match="holds int64; this put gives string"):
        s.check("p", batch([1], x=["a"]))
    s.check("p", batch([1], x=pa.array([None], pa.null())))  # all-null values fit any type
    s.evict("p", [0])
    with pytest.raises(ValueError, match="evicted; a late write is refused"):
        s.check("p", batch([0], x=[2]))


def test_eviction_frees_batches_and_compacts_half_empty_ones():
    s = Shard()
    blob = b"z" * 4096
    n = COMPACT_MIN_BYTES // 4096 * 2
    s.put("p", batch(list(range(n)), v=[blob] * n, k=list(range(n))))
    s.put("p", batch([n], v=[blob], k=[n]))
    full = s.nbytes
    s.evict("p", range(n // 2 + 1))
    assert s.nbytes < full * 0.6  # compacted: the live half was copied out
    assert s.get("p", [n - 1, n // 2 + 1], ["k"])["k"].to_pylist() == [n - 1, n // 2 + 1]
    s.evict("p", range(n + 1))
    assert s.nbytes == 0 and s.num_rows() == 0


def test_newly_finished_reports_each_row_once():
    s = Shard()
    s.put("p", batch([0, 1], x=[1, 2]))
    assert s.newly_finished("p", [0, 1], ["x", "r"]) == []
    s.put("p", batch([1], r=[0.5]))
    assert s.newly_finished("p", [1], ["x", "r"]) == [1]
    s.put("p", batch([1], r=[0.7]))
    assert s.newly_finished("p", [1], ["x", "r"]) == []


def test_row_log_round_trip_schema_roll_and_torn_tail(tmp_path):
    w = dlog.RowLog(tmp_path, unit=0, session="s1")
    w.append("train", pa.table({INDEX: [0, 1], "x": [1, 2], "note": pa.array([None, None], pa.null())}))
    w.append("train", pa.table({INDEX: [2], "x": [3], "note": ["hi"]}))  # null -> string: a new segment
    w.append("train", pa.table({INDEX: [1], "x": [20], "note": ["again"]}))
    w.close()
    assert len(dlog.segments(tmp_path, "train")) == 2
    rows = dlog.read_rows(tmp_path, "train")
    assert rows.column(INDEX).to_pylist() == [0, 1, 2] and rows.column("x").to_pylist() == [1, 20, 3]
    assert dlog.LOGGED_AT in rows.column_names
    assert dlog.read_rows(tmp_path, "train", columns=["x"]).column_names == [INDEX, "x"]
    # a writer killed mid-batch: cut the last segment short; the batches before the cut survive
    last = dlog.segments(tmp_path, "train")[-1]
    w2 = dlog.RowLog(tmp_path, unit=1, session="s2")
    w2.append("train", pa.table({INDEX: [5], "x": [5], "note": ["a"]}))
    w2.append("train", pa.table({INDEX: [6], "x": [6], "note": ["b"]}))
    w2.close()
    seg = [p for p in dlog.segments(tmp_path, "train") if p.name.startswith("u001")][0]
    seg.write_bytes(seg.read_bytes()[:-40])
    assert sorted(dlog.read_rows(tmp_path, "train").column(INDEX).to_pylist()) == [0, 1, 2, 5]
    assert last.exists()


def test_consumption_log_survives_a_torn_line_and_rewrites_compactly(tmp_path):
    c = dlog.ConsumptionLog(tmp_path)
    c.append("train", "trainer", "take", [0, 1])
    c.append("train", "trainer", "discard", [2])
    c.append("train", "reward", "take", [0])
    c.close()
    with open(tmp_path / dlog.CONSUMED, "a") as f:
        f.write('{"partition": "train", "consumer": "trainer", "op": "take", "indexes": [9')
    got = dlog.read_consumed(tmp_path)
    assert got["train"]["trainer"] == {0, 1, 2} and got["train"]["reward"] == {0}
    dlog.rewrite_consumed(tmp_path, {"train": {"trainer": [1, 0]}})
    lines = (tmp_path / dlog.CONSUMED).read_text().splitlines()
    assert [json.loads(x)["indexes"] for x in lines] == [[0, 1]]
