"""Rollout workers on real vLLM (CPU): interruptible updates, routing, engine failure, multi-turn."""

import asyncio
import os
import signal
import time

import pytest
import ray
import torch

from datastore.client import DataStore
from rl.core.config import AgentConfig, RolloutConfig
from rl.models import load_causal_lm, load_tokenizer

from rollout.router import RolloutRouter
from rollout.records import GroupRequest
from rollout.worker import SAMPLE_FIELDS, RolloutActor, stop_workers

pytestmark = pytest.mark.slow

TOOL = os.path.join(os.path.dirname(__file__), "toy_tool.py")


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model):
    """Two engines on one store; each test uses its own partition."""
    store = DataStore.create(1, tag_fields=["version"], declared_fields=SAMPLE_FIELDS)
    cfg = RolloutConfig(max_tokens=40, max_model_len=160, ignore_eos=True,
                        agent=AgentConfig(fn=f"{TOOL}:calculator", max_turns=3))
    ws = [RolloutActor.remote(i, tiny_model, cfg, store, "p", "float32", "cpu", 0, 120) for i in range(2)]
    ray.get([w.start.remote() for w in ws], timeout=300)
    yield store, ws, tiny_model
    stop_workers(ws, 30)
    store.shutdown()


def requests(tok, groups, n, start=0, prompt="3+4="):
    ids = tok(prompt)["input_ids"]
    return [GroupRequest(group=start + g, prompt=prompt, prompt_ids=ids, row='{"answer": "7"}', n=n) for g in range(groups)]


def wait_in_flight(worker, n: int, extra_s: float = 0.15) -> None:
    """Until `worker` holds at least n requests, then a few engine steps more (so they have tokens)."""
    t0 = time.monotonic()
    while ray.get(worker.stats.remote(), timeout=30).inflight < n:
        assert time.monotonic() - t0 < 60, f"the worker never held {n} requests"
        time.sleep(0.02)
    time.sleep(extra_s)


def fields(store, n_rows, consumer):
    return store.get(consumer, "p", ["response_ids", "logprobs", "token_versions", "loss_mask", "version", "worker",
                                     "turns", "response"], n_rows, timeout=60).to_pylist()


def test_interrupted_update_keeps_tokens_and_records_versions(engines):
    from rl.core.transport import ShmFileSender

    store, ws, path = engines
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # version 1 differs from version 0
    sender = ShmFileSender("test-interrupt")
    handle = sender.send(model.state_dict().items(), version=1)
    reqs = requests(tok, 64, 4, start=0, prompt="plain ")  # 256 requests x 40 tokens: about a second here
    refs = [ws[0].generate_group.remote(r) for r in reqs]
    wait_in_flight(ws[0], 256)  # requests are mid-generation now
    upd = ray.get(ws[0].update_weights.remote(handle), timeout=60)
    res = ray.get(refs, timeout=120)
    sender.close()
    assert all(not r.failed for r in res)
    rows = fields(store, 256, "interrupt-check")
    assert len(rows) == 256
    switched = 0
    for r in rows:
        assert len(r["response_ids"]) == 40 == len(r["logprobs"]) == len(r["token_versions"])  # nothing lost
        v = r["token_versions"]
        assert v == sorted(v) and set(v) <= {0, 1}  # versions only move forward
        assert r["version"] == v[0]
        switched += 0 < v.index(1) if 1 in v else 0
    assert switched > 0, "no request was in flight across the update"
    print(f"requests that switched weights mid-generation: {switched}/256; update took {upd}")


def test_router_spreads_load_over_engines(engines):
    store, ws, path = engines
    tok = load_tokenizer(path)
    router = RolloutRouter(ws, max_tokens=40, timeout_s=120)

    async def go():
        return await asyncio.gather(*[router.run_group(r) for r in requests(tok, 12, 2, start=100)])

    res = asyncio.run(go())
    assert all(len(r.done) == 2 for r in res)
    assert sorted(router.routed) == [6, 6], router.routed  # equal groups, equal cost: an even split
    assert router.outstanding == [0, 0]
    rows = store.get("route", "p", ["worker", "group"], 10_000, min_n=1, timeout=60).to_pylist()
    workers = [r["worker"] for r in rows if 100 <= r["group"] < 112]
    assert len(workers) == 24
    assert set(workers) == {0, 1}


def test_multi_turn_tool_tokens_are_masked(engines):
    store, ws, path = engines
    tok = load_tokenizer(path)
    res = ray.get(ws[1].generate_group.remote(requests(tok, 1, 2, start=200, prompt="calc: ")[0]), timeout=120)
    assert res.done == [0, 1]
    rows = [r for r in store.get("agent", "p", ["response_ids", "loss_mask", "logprobs", "turns", "response", "group"],
                                 10_000, min_n=1, timeout=60).to_pylist() if r["group"] == 200]
    assert len(rows) == 2
    tool_ids = tok("[tool:42]", add_special_tokens=False)["input_ids"]
    for r in rows:
        assert r["turns"] == 3  # three model turns, two tool turns between them
        mask = r["loss_mask"]
        assert len(mask) == len(r["response_ids"]) == len(r["logprobs"])
        assert mask.count(0) == 2 * len(tool_ids)  # every tool token is out of the loss
        first_tool = mask.index(0)
        assert r["response_ids"][first_tool:first_tool + len(tool_ids)] == tool_ids
        assert all(lp == 0.0 for lp, m in zip(r["logprobs"], mask) if m == 0)
        assert "[tool:42]" in r["response"]


def test_drain_update_lets_in_flight_requests_finish_on_the_old_weights(engines):
    """update_mode drain: requests in the engine when the update comes finish wholly on version 0 (none
    switches weights mid-way, as in interrupt mode); requests after it run on version 1."""
    from rl.core.transport import ShmFileSender

    store, ws, path = engines
    tok = load_tokenizer(path)
    ray.get(ws[1].__ray_call__.remote(lambda w: setattr(w.cfg, "update_mode", "drain")), timeout=30)
    sender = ShmFileSender("test-drain")
    try:
        handle = sender.send(load_causal_lm(path).state_dict().items(), version=1)
        refs = [ws[1].generate_group.remote(r) for r in requests(tok, 32, 4, start=400, prompt="plain ")]
        wait_in_flight(ws[1], 128)  # requests are mid-generation now
        upd = ray.get(ws[1].update_weights.remote(handle), timeout=120)
        after = ray.get(ws[1].generate_group.remote(requests(tok, 1, 2, start=432, prompt="plain ")[0]), timeout=120)
        ray.get(refs, timeout=120)
    finally:
        sender.close()
        ray.get(ws[1].__ray_call__.remote(lambda w: setattr(w.cfg, "update_mode", "interrupt")), timeout=30)
    assert after.done == [0, 1]
    rows = [r for r in store.get("drain-check", "p", ["group", "token_versions", "version"], 10_000, min_n=1,
                                 timeout=60).to_pylist() if 400 <= r["group"] <= 432]
    assert len(rows) == 130
    mixed = [r["token_versions"] for r in rows if len(set(r["token_versions"])) > 1]
    assert not mixed, f"drain mode let {len(mixed)} requests switch weights mid-generation"
    old = [r for r in rows if r["group"] < 432 and r["version"] == 0]
    assert old, "no request was in flight when the update came"
    assert all(set(r["token_versions"]) == {1} for r in rows if r["group"] == 432)
    print(f"drain: {len(old)}/128 requests finished on version 0 first; update took {upd.seconds:.3f} s")


def check_update_modes(store, w, path: str, consumer: str, settle_s: float = 0.15) -> None:
    """Prefix caching is on (the engine runs a multi-turn hook). interrupt keeps cached KV across an update
    (a repeated prompt still hits); recompute and drain drop it, so the first request after the update
    prefills on the new weights; in recompute mode requests in flight at the update are re-prefilled and
    still finish whole."""
    from rl.core.transport import ShmFileSender

    tok = load_tokenizer(path)
    prompt = "abc " * 33  # ~133 tokens: a full KV block (128 on CPU, 16 on GPU), room for new tokens in 160
    state = load_causal_lm(path).state_dict()
    sender = ShmFileSender(f"test-prefix-{consumer}")

    def cached() -> int:
        return ray.get(w.stats.remote(), timeout=30).cached_tokens

    def one(group: int) -> int:
        before = cached()
        ray.get(w.generate_group.remote(requests(tok, 1, 1, start=group, prompt=prompt)[0]), timeout=120)
        return cached() - before

    def update(mode: str) -> None:
        ray.get(w.__ray_call__.remote(lambda x: setattr(x.cfg, "update_mode", mode)), timeout=30)
        version = ray.get(w.stats.remote(), timeout=30).version + 1
        ray.get(w.update_weights.remote(sender.send(state.items(), version=version)), timeout=120)

    try:
        one(500)
        assert one(501) > 0, "a repeated prompt should hit the prefix cache"
        update("interrupt")
        hits_interrupt = one(502)
        update("recompute")
        hits_recompute = one(503)
        assert one(504) > 0  # cached again, now on the new weights
        update("drain")
        hits_drain = one(505)
        refs = [w.generate_group.remote(r) for r in requests(tok, 16, 4, start=510, prompt="plain ")]
        wait_in_flight(w, 64, settle_s)
        update("recompute")  # preempts the requests in flight: they re-prefill on the new weights
        res = ray.get(refs, timeout=120)
    finally:
        ray.get(w.__ray_call__.remote(lambda x: setattr(x.cfg, "update_mode", "interrupt")), timeout=30)
        sender.close()
    assert hits_interrupt > 0, "interrupt mode keeps the prefix cache across an update"
    assert hits_recompute == 0 and hits_drain == 0, (hits_recompute, hits_drain)
    assert all(sorted(r.done) == [0, 1, 2, 3] for r in res)
    rows = [r for r in store.get(consumer, "p", ["group", "response_ids", "logprobs", "token_versions"], 10_000,
                                 min_n=1, timeout=60).to_pylist() if 510 <= r["group"] < 526]
    assert len(rows) == 64
    assert all(len(r["response_ids"]) == len(r["logprobs"]) == len(r["token_versions"]) == 40 for r in rows)
    print(f"update modes: interrupt kept {hits_interrupt} cached prompt tokens; recompute and drain kept none")


def test_update_modes_and_the_prefix_cache(engines):
    store, ws, path = engines
    check_update_modes(store, ws[1], path, "prefix-check")


@pytest.mark.gpu
def test_update_modes_and_the_prefix_cache_on_gpu(ray_session, tiny_model):
    """The same on CUDA, where the engine's vLLM is the GPU machine's (0.24 there)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    store = DataStore.create(1, tag_fields=["version"], declared_fields=SAMPLE_FIELDS)
    cfg = RolloutConfig(max_tokens=40, max_model_len=160, ignore_eos=True, gpu_memory_utilization=0.3,
                        agent=AgentConfig(fn=f"{TOOL}:calculator", max_turns=3))
    w = RolloutActor.options(num_gpus=1).remote(0, tiny_model, cfg, store, "p", "float32", "cuda", 0, 300)
    try:
        ray.get(w.start.remote(), timeout=400)
        check_update_modes(store, w, tiny_model, "prefix-check-gpu", settle_s=0.0)  # a GPU decodes 40 tokens fast
    finally:
        stop_workers([w], 30)
        store.shutdown()


def test_killed_engine_requests_finish_elsewhere(engines):
    store, ws, path = engines
    tok = load_tokenizer(path)
    router = RolloutRouter(ws, max_tokens=40, timeout_s=120)
    pid = ray.get(ws[0].engine_pid.remote(), timeout=30)
    assert pid > 0

    async def go():
        tasks = [asyncio.create_task(router.run_group(r)) for r in requests(tok, 32, 4, start=300, prompt="plain ")]
        await asyncio.to_thread(wait_in_flight, ws[0], 64)
        os.kill(pid, signal.SIGKILL)  # the engine core process dies mid-generation
        return await asyncio.gather(*tasks)

    res = asyncio.run(go())
    assert all(sorted(r.done) == [0, 1, 2, 3] for r in res)
    assert router.failures and router.failures[0]["engine"] == 0
    idx = store.get("fail", "p", ["group"], 10_000, min_n=1, timeout=60).to_pydict()
    mine = sorted(i for i, g in zip(idx["index"], idx["group"]) if 300 <= g < 332)
    assert mine == [g * 4 + j for g in range(300, 332) for j in range(4)]  # every sample once, none twice
