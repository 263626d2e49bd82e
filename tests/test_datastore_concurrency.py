"""Concurrent producers and consumers (threads and Ray actors) on a real local Ray: no row is lost and
none is delivered twice to a consumer, counted index by index; and every row is evicted at the end."""

import sys
import threading
import time
from collections import Counter

import ray
from ray import cloudpickle

from datastore.client import DataStore

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors below run in worker processes

FIELDS = ["x", "payload", "version", "r"]
GROUP = 4
PER_PRODUCER = 96  # rows each producer writes, in puts of 8 (two groups)


def produce(store, worker: int, nproducers: int) -> int:
    """Groups worker, worker + nproducers, ... : disjoint indexes, written 8 rows a put."""
    groups = list(range(worker, PER_PRODUCER * nproducers // GROUP, nproducers))
    for k in range(0, len(groups), 2):
        idx = [g * GROUP + j for g in groups[k:k + 2] for j in range(GROUP)]
        store.put("train", idx, {"x": idx, "payload": [b"p" * 512] * len(idx), "version": [worker] * len(idx)},
                  timeout=30)
    return len(groups) * GROUP


@ray.remote(num_cpus=0)
class Producer:
    def run(self, store, worker: int, nproducers: int) -> int:
        return produce(store, worker, nproducers)


@ray.remote(num_cpus=0, max_concurrency=4)
class Scorer:
    """Like the reward worker: takes rows with x, writes r = 2x; returns every index it took."""

    async def run(self, store, total: int, deadline_s: float) -> list[int]:
        seen: list[int] = []
        t_end = time.monotonic() + deadline_s
        while time.monotonic() < t_end:
            take = await store.atake("reward", "train", ["x"], 16, min_n=1, timeout=0.5)
            if take is None:
                if (await store.astats())["partitions"]["train"]["consumers"]["reward"]["untaken"] == 0 \
                        and await self._all_put(store, total):
                    break
                continue
            table = await store.afetch("train", take, ["x"])
            xs = table["x"].to_pylist()
            await store.aput("train", take.indexes, {"r": [2.0 * x for x in xs]})
            seen.extend(take.indexes)
        await store.arelease("reward")
        return seen

    async def _all_put(self, store, total: int) -> bool:
        return (await store.astats())["rows_created"] >= total


def train(store, out: list, errors: list, total: int) -> None:
    """Like the trainer: whole groups with every field, checks each payload matches its index."""
    try:
        while True:
            have = sum(len(t) for t in out)
            if have >= total // 2:  # two trainer threads share the work
                break
            table = store.get("trainer", "train", ["x", "r", "payload"], 2 * GROUP, group_size=GROUP, timeout=30)
            rows = table.to_pydict()
            assert rows["x"] == rows["index"] and rows["r"] == [2.0 * i for i in rows["index"]]
            out.append(rows["index"])
    except Exception as exc:  # surfaced by the test
        errors.append(exc)


def test_no_row_lost_or_duplicated_under_concurrency(ray_session):
    store = DataStore.create(num_storage_units=2, tag_fields=["version"], declared_fields=FIELDS,
                             required_consumers=["reward", "trainer"], capacity_rows=256, timeout_s=60)
    try:
        nprod = 4
        total = PER_PRODUCER * nprod
        actors = [Producer.remote() for _ in range(2)]
        scorers = [Scorer.remote() for _ in range(2)]
        scored = [s.run.remote(store, total, 60) for s in scorers]
        produced = [a.run.remote(store, w, nprod) for w, a in enumerate(actors)]
        threads_out: list[int] = []
        prod_threads = [threading.Thread(target=lambda w=w: threads_out.append(produce(store, w, nprod)))
                        for w in (2, 3)]
        trained: list[list[int]] = [[], []]
        errors: list[Exception] = []
        train_threads = [threading.Thread(target=train, args=(store, trained[k], errors, total)) for k in range(2)]
        for t in prod_threads + train_threads:
            t.start()
        for t in prod_threads + train_threads:
            t.join(timeout=90)
        assert not errors, errors
        assert sum(ray.get(produced, timeout=60)) + sum(threads_out) == total
        reward_seen = [i for part in ray.get(scored, timeout=90) for i in part]
        trainer_seen = [i for part in trained for batch in part for i in batch]
        for seen in (reward_seen, trainer_seen):
            dup = [i for i, c in Counter(seen).items() if c > 1]
            assert not dup, f"delivered twice: {dup[:10]}"
            assert sorted(seen) == list(range(total)), f"lost: {sorted(set(range(total)) - set(seen))[:10]}"
        store.release("trainer")
        deadline = time.monotonic() + 10
        while (s := store.stats())["rows_held"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s["rows_held"] == 0 and s["rows_evicted"] == total and s["unit_bytes_held"] == 0
    finally:
        store.shutdown()
