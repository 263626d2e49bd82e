"""Data store throughput: put and get through streamrl's store versus plain `ray.put` / `ray.get`.

For each number of storage units and each row size: one producer puts --total-mib of rows (a binary
`payload` field) in puts of about --put-kib, then one consumer gets them all back in gets of about
--get-kib (take + fetch from the units + release, so rows are evicted as they go). The baseline, timed in
the same run right after, moves the same record batches with `ray.put` (one object per put) and
`ray.get` (the objects of one get, concatenated to one table). Both sides run in this driver process;
the store crosses processes (driver -> storage unit -> driver), `ray.get` reads the local object store
zero-copy, so the baseline is the floor: the ratio says what the store's bookkeeping and hops cost.
A second reference, "actor", sends the same batches to one plain Ray actor that keeps them in a dict and
returns them concatenated: the cost of a process hop without any of the store's bookkeeping.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

import pyarrow as pa

from rl.bench import print_table

MiB = 2**20


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--units", default="1,2,4", help="numbers of storage units, comma separated")
    p.add_argument("--sizes", default="1024,262144", help="payload bytes per row, comma separated")
    p.add_argument("--total-mib", type=float, default=32.0, help="payload moved per (units, size) and direction")
    p.add_argument("--put-kib", type=int, default=256, help="payload per put (rows per put = this / row size, 1..256)")
    p.add_argument("--get-kib", type=int, default=1024, help="payload per get (rows per get = this / row size, 1..256)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side; the best is reported")
    p.add_argument("--no-log", dest="log", action="store_false",
                   help="skip the runs of the largest unit count with the durable log on")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray started for the bench")


def _rows_per(kib: int, size: int) -> int:
    return max(1, min(256, kib * 1024 // size))


def _batches(size: int, total_rows: int, per_put: int) -> list[tuple[list[int], pa.Table]]:
    blob = os.urandom(size)
    out = []
    for start in range(0, total_rows, per_put):
        idx = list(range(start, min(total_rows, start + per_put)))
        out.append((idx, pa.table({"payload": pa.array([blob] * len(idx), pa.binary())})))
    return out


def _time_store(units: int, batches: list[tuple[list[int], pa.Table]], per_get: int, log_dir: str | None) -> tuple[float, float]:
    from datastore.client import DataStore

    store = DataStore.create(units, declared_fields=["payload"], required_consumers=["bench"], timeout_s=120,
                             log_dir=log_dir)
    try:
        store.put("warm", [0], {"payload": [b"x"]})  # first-call costs (imports, connections) out of the timing
        store.get("bench", "warm", ["payload"], 1, timeout=30)
        total = sum(len(i) for i, _ in batches)
        t0 = time.perf_counter()
        for idx, table in batches:
            store.put("bench", idx, table, timeout=120)
        t_put = time.perf_counter() - t0
        got = 0
        t0 = time.perf_counter()
        while got < total:
            got += store.get("bench", "bench", ["payload"], min(per_get, total - got), timeout=120).num_rows
        t_get = time.perf_counter() - t0
        assert got == total
        return t_put, t_get
    finally:
        store.shutdown()


def _holder():
    import ray

    @ray.remote(num_cpus=0)
    class Holder:
        """A plain actor holding put batches by key: the store's data plane without its bookkeeping."""

        def __init__(self) -> None:
            self.held: dict[int, pa.Table] = {}

        def put(self, key: int, table: pa.Table) -> int:
            self.held[key] = table
            return table.num_rows

        def get(self, keys: list[int]) -> pa.Table:
            return pa.concat_tables([self.held.pop(k) for k in keys])

    return Holder.remote()


def _time_actor(holder: Any, batches: list[tuple[list[int], pa.Table]], per_get: int) -> tuple[float, float]:
    import ray

    t0 = time.perf_counter()
    for k, (_, table) in enumerate(batches):
        ray.get(holder.put.remote(k, table), timeout=120)
    t_put = time.perf_counter() - t0
    step = max(1, per_get // len(batches[0][0]))
    t0 = time.perf_counter()
    for start in range(0, len(batches), step):
        ray.get(holder.get.remote(list(range(start, min(len(batches), start + step)))), timeout=120)
    return t_put, time.perf_counter() - t0


def _time_baseline(batches: list[tuple[list[int], pa.Table]], per_get: int) -> tuple[float, float]:
    import ray

    t0 = time.perf_counter()
    refs = [ray.put(table) for _, table in batches]
    t_put = time.perf_counter() - t0
    per_put = len(batches[0][0])
    k = max(1, per_get // per_put)  # objects per get: the same rows as one store get
    t0 = time.perf_counter()
    rows = 0
    for start in range(0, len(refs), k):
        rows += pa.concat_tables(ray.get(refs[start:start + k], timeout=120)).num_rows
    t_get = time.perf_counter() - t0
    del refs
    return t_put, t_get


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    units_list = [int(u) for u in args.units.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    configs = [(u, s, False) for s in sizes for u in units_list]
    if args.log:
        configs += [(max(units_list), s, True) for s in sizes]
    table_rows, figures = [], []
    holder = _holder()
    try:
        for units, size, with_log in configs:
            per_put, per_get = _rows_per(args.put_kib, size), _rows_per(args.get_kib, size)
            total_rows = max(per_put * 4, int(args.total_mib * MiB // size) // per_put * per_put)
            batches = _batches(size, total_rows, per_put)
            best_store = best_base = best_actor = (float("inf"),) * 2
            for _ in range(args.repeats):
                log_dir = tempfile.mkdtemp(prefix="streamrl-bench-ds-") if with_log else None
                try:
                    s = _time_store(units, batches, per_get, log_dir)
                finally:
                    if log_dir:
                        shutil.rmtree(log_dir, ignore_errors=True)
                b = _time_baseline(batches, per_get)
                a = _time_actor(holder, batches, per_get)
                best_store = tuple(min(x, y) for x, y in zip(best_store, s))
                best_base = tuple(min(x, y) for x, y in zip(best_base, b))
                best_actor = tuple(min(x, y) for x, y in zip(best_actor, a))
            mib = total_rows * size / MiB
            for op, k, per in (("put", 0, per_put), ("get", 1, per_get)):
                fig = {
                    "units": units, "row_bytes": size, "log": with_log, "op": op, "rows": total_rows,
                    "rows_per_call": per,
                    "store_rows_per_s": total_rows / best_store[k], "store_mb_per_s": mib / best_store[k],
                    "ray_rows_per_s": total_rows / best_base[k], "ray_mb_per_s": mib / best_base[k],
                    "store_over_ray": best_base[k] / best_store[k],
                    "actor_rows_per_s": total_rows / best_actor[k], "store_over_actor": best_actor[k] / best_store[k],
                }
                figures.append(fig)
                table_rows.append({
                    "units": f"{units}{' +log' if with_log else ''}", "row": _human(size), "op": op,
                    "rows/call": per, "store rows/s": fig["store_rows_per_s"], "store MiB/s": fig["store_mb_per_s"],
                    "ray rows/s": fig["ray_rows_per_s"], "ray MiB/s": fig["ray_mb_per_s"],
                    "store/ray": round(fig["store_over_ray"], 3), "actor rows/s": fig["actor_rows_per_s"],
                    "store/actor": round(fig["store_over_actor"], 3),
                })
    finally:
        if started:
            ray.shutdown()
    print_table(table_rows, "data store vs ray.put/ray.get (one producer, one consumer, same batches)")
    return {"figures": figures, "settings": {k: v for k, v in vars(args).items() if k != "out"}}


def _human(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 and n < MiB else (f"{n // MiB} MiB" if n % MiB == 0 else f"{n} B")
