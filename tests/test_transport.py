"""The weight channel on its own: real gloo groups between real processes, no vLLM (fast)."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from rl.core.transport import (ALIGN, ChannelError, ChannelSpec, WeightHandle, make_receiver, make_sender, pick_transport,
                          plan_buckets, tensor_view)
from trainer.weights import WeightSender


def test_plan_buckets_bounds_size_aligns_and_keeps_order():
    metas = [("a", torch.float32, (10,)), ("b", torch.bfloat16, (3, 5)), ("c", torch.float32, (100,)),
             ("big", torch.float32, (1000,)), ("d", torch.int64, ())]
    plan = plan_buckets(metas, bucket_bytes=512)
    names = [[t.name for t in b.tensors] for b in plan]
    assert names == [["a", "b"], ["c"], ["big"], ["d"]]
    assert plan[0].tensors[1].offset == ALIGN and plan[0].nbytes == ALIGN + 30
    assert plan[2].nbytes == 4000  # larger than a bucket: a bucket of its own
    assert all(b.nbytes <= 512 for b in plan if len(b.tensors) > 1)
    assert all(t.offset % ALIGN == 0 for b in plan for t in b.tensors)


def test_pick_transport_rules():
    assert pick_transport("auto", "cpu") == "gloo"
    assert pick_transport("auto", "cuda") == "nccl"
    assert pick_transport("auto", "cuda", colocated=True) == "ipc"
    assert pick_transport("shm", "cuda") == "shm"
    with pytest.raises(ValueError, match="needs CUDA"):
        pick_transport("nccl", "cpu")
    with pytest.raises(ValueError, match="valid: auto, shm, gloo, nccl, ipc"):
        pick_transport("tcp", "cpu")


def _receiver(spec: dict, rank: int, syncs: int, out: mp.Queue, die_before: int = -1) -> None:
    """An engine worker's part: join, then for each sync collect every tensor (cloned) and report them."""
    try:
        recv = make_receiver(ChannelSpec(**spec), rank, torch.device("cpu"))
        for s in range(syncs):
            if s == die_before:
                import os

                os._exit(3)
            got = {name: t.clone() for name, t in recv.receive(WeightHandle(kind=spec["kind"]))}
            out.put((rank, s, recv.stats["version"], got))
    except Exception as exc:  # reported to the test, which asserts on it
        out.put((rank, -1, -1, repr(exc)))


def _start(spec: ChannelSpec, ranks: list[int], syncs: int, die_before: int = -1) -> tuple[list, mp.Queue]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(spec.__dict__ | {}, r, syncs, q, die_before), daemon=True)
             for r in ranks]
    for p in procs:
        p.start()
    return procs, q


class _Tiny(torch.nn.Module):
    """Three weights, two of them tied (they travel once, like tied embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight


def _check(got: dict, model: torch.nn.Module) -> None:
    want = {n: t.to(torch.bfloat16) for n, t in model.state_dict().items() if n != "out.weight"}
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]), n


def _perturb(model: torch.nn.Module, version: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * version)


def test_gloo_sender_to_two_receivers_is_exact_over_several_syncs():
    torch.manual_seed(0)
    model = _Tiny()
    sender = WeightSender(model, 0, torch.device("cpu"), torch.bfloat16, "gloo", bucket_bytes=520, timeout_s=60)
    assert len(sender.plan) == 3  # several buckets
    spec = sender.open(num_receivers=2, host="127.0.0.1")
    procs, q = _start(spec, [1, 2], syncs=2)
    sender.connect()
    for version in (1, 2):
        _perturb(model, version)
        handle = sender.send(version)
        assert handle.nbytes == sender.nbytes and handle.meta["buckets"] == len(sender.plan)
        for _ in range(2):
            rank, s, v, got = q.get(timeout=60)
            assert not isinstance(got, str), got
            assert v == version
            _check(got, model)
    for p in procs:
        p.join(30)
    sender.close()


def test_shm_sender_writes_once_and_receivers_read_after():
    torch.manual_seed(0)
    model = _Tiny()
    sender = WeightSender(model, 0, torch.device("cpu"), torch.bfloat16, "shm", bucket_bytes=520, timeout_s=60)
    spec = sender.open(num_receivers=2, host="127.0.0.1")
    assert not spec.streams
    receiver = make_receiver(spec, 1, torch.device("cpu"))
    _perturb(model, 1)
    handle = sender.send(7)
    assert handle.version == 7 and handle.path
    _check({n: t.clone() for n, t in receiver.receive(handle)}, model)
    sender.release(handle)
    sender.close()


def test_missing_receiver_fails_the_sender_with_the_missing_rank():
    sender = make_sender("gloo", 0, torch.device("cpu"), timeout_s=3)
    spec = sender.open(2, "127.0.0.1", [])
    procs, _ = _start(spec, [1], syncs=0)  # rank 2 never joins
    deadline = time.monotonic() + 120
    while not sender.store.check(["streamrl-weights/member/1"]) and time.monotonic() < deadline:
        time.sleep(0.1)  # rank 1's process is up (slow on a busy machine)
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match=r"ranks \[2\].*1 of 2 joined"):
        sender.connect()
    assert time.monotonic() - t0 < 10
    for p in procs:
        p.kill()


def test_dead_receiver_fails_the_send_instead_of_hanging():
    model = _Tiny()
    sender = WeightSender(model, 0, torch.device("cpu"), torch.float32, "gloo", bucket_bytes=520, timeout_s=20)
    spec = sender.open(2, "127.0.0.1")
    procs, q = _start(spec, [1], syncs=1)
    procs2, _ = _start(spec, [2], syncs=2, die_before=0)  # joins, then dies before the sync
    sender.connect()
    t0 = time.monotonic()
    with pytest.raises(ChannelError, match="gloo weight channel") as err:
        sender.send(1)
    print("dead receiver ->", err.value, f"after {time.monotonic() - t0:.1f} s")
    assert time.monotonic() - t0 < 60
    with pytest.raises(ChannelError, match="broke earlier"):
        sender.send(2)
    for p in procs + procs2:
        p.kill()
