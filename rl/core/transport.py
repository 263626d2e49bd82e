"""The weight channel between trainer and rollout engines: one small interface, one implementation per link.

Weights travel in buckets: a bucket is one flat byte buffer holding several full tensors (each at a 256-byte
aligned offset) of at most `rollout.weight_bucket_mb`. The trainer fills a bucket, the channel moves it,
each engine worker cuts it back into (name, tensor) views and hands them to vLLM's weight loader, which
takes the tensor-parallel shard it owns (that is the reshard).

    kind   bytes travel by                                    where
    shm    one safetensors file in /dev/shm, read by every engine   one machine, CPU or GPU
    gloo   broadcast in a gloo group: trainer rank 0 + every engine worker   CPU, any nodes
    nccl   broadcast in an NCCL group (vLLM's PyNcclCommunicator); control over gloo   GPUs, any nodes
    ipc    CUDA IPC handles of each trainer GPU's copy, opened by the engine worker on that GPU;
           handles and acknowledgements over gloo                     trainer and engine share GPUs

Every streaming kind (all but shm) has one control group: a gloo group of the sender (rank 0) and every
engine worker, built on its own TCPStore, apart from the trainer's and the engines' default process
groups, with a timeout on every operation. A sync starts with a header broadcast (version, bucket plan),
so the receivers need nothing from the controller but "receive now"; both sides must run at once.

`ChannelSender` (trainer side, one per trainer rank) and `ChannelReceiver` (inside each vLLM worker
process) are the interface; `make_sender` / `make_receiver` pick the implementation by name.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import torch

TRANSPORTS = ("auto", "shm", "gloo", "nccl", "ipc")
ALIGN = 256  # byte alignment of every tensor inside a bucket (any dtype view is legal, GPU copies coalesce)


class ChannelError(RuntimeError):
    """A weight-channel operation failed or timed out; the message says which, with whom, and how long."""


def pick_transport(requested: str, device: str, colocated: bool = False) -> str:
    """The transport for `rollout.weight_transport`: auto is gloo on CPU, nccl on GPUs, ipc when the trainer
    and the engines share GPUs (`colocated`)."""
    if requested not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {requested!r}; valid: {', '.join(TRANSPORTS)}")
    if requested in ("nccl", "ipc") and device != "cuda":
        raise ValueError(f"weight transport {requested!r} needs CUDA GPUs (resources.device is {device!r}); "
                         "use gloo or shm on CPU")
    if requested == "nccl" and colocated:
        raise ValueError("weight transport 'nccl' cannot put the trainer and an engine on one GPU; use ipc")
    if requested != "auto":
        return requested
    if device != "cuda":
        return "gloo"
    return "ipc" if colocated else "nccl"


# --------------------------------------------------------------------------- buckets
@dataclass
class TensorSpec:
    name: str
    dtype: str  # torch dtype name without "torch."
    shape: list[int]
    offset: int  # byte offset inside the bucket
    nbytes: int


@dataclass
class Bucket:
    tensors: list[TensorSpec]
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def plan_buckets(metas: Sequence[tuple[str, torch.dtype, Sequence[int]]], bucket_bytes: int) -> list[Bucket]:
    """Greedy, in order: a bucket closes when the next tensor would take it past `bucket_bytes`. A tensor
    larger than that gets a bucket of its own."""
    buckets: list[Bucket] = []
    cur: list[TensorSpec] = []
    size = 0
    for name, dtype, shape in metas:
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        start = -(-size // ALIGN) * ALIGN
        if cur and start + n > bucket_bytes:
            buckets.append(Bucket(cur, size))
            cur, start = [], 0
        cur.append(TensorSpec(name, dtype_name(dtype), list(shape), start, n))
        size = start + n
    if cur:
        buckets.append(Bucket(cur, size))
    return buckets


def tensor_view(buf: torch.Tensor, t: TensorSpec) -> torch.Tensor:
    """The tensor `t` inside the flat uint8 buffer of its bucket (a view: no copy)."""
    return buf[t.offset: t.offset + t.nbytes].view(getattr(torch, t.dtype)).view(t.shape)


def unpack(buf: torch.Tensor, bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    for t in bucket.tensors:
        yield t.name, tensor_view(buf, t)


def _plan_to_json(version: int, probe: bool, plan: list[Bucket]) -> bytes:
    return json.dumps({"version": version, "probe": probe, "buckets": [asdict(b) for b in plan]}).encode()


def _plan_from_json(raw: bytes) -> tuple[int, bool, list[Bucket]]:
    d = json.loads(raw)
    plan = [Bucket([TensorSpec(**t) for t in b["tensors"]], b["nbytes"]) for b in d["buckets"]]
    return d["version"], d["probe"], plan


# --------------------------------------------------------------------------- what travels by RPC
@dataclass
class ChannelSpec:
    """How receivers join a channel; made by the trainer's rank 0, sent to every engine worker once."""

    kind: str
    world_size: int = 1  # rank 0 (trainer) + every engine worker
    host: str = ""
    port: int = 0  # TCPStore of the control group
    nccl_port: int = 0  # StatelessProcessGroup of the NCCL data group
    timeout_s: float = 300.0
    sender_gpus: list[str] = field(default_factory=list)  # GPU UUIDs of the trainer ranks (ipc / nccl checks)

    @property
    def streams(self) -> bool:
        """True: sender and receivers must run at once (a broadcast group); False: receivers read afterwards."""
        return self.kind != "shm"


@dataclass
class WeightHandle:
    """One sync. For streaming kinds the controller makes it with version -1 and the receivers learn the
    version in band; for shm the sender returns it once the file is written."""

    kind: str
    version: int = -1
    path: str = ""
    num_tensors: int = 0
    nbytes: int = 0
    probe: bool = False  # move the same bytes but load nothing: the link baseline of the benchmark
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the interface
class ChannelSender(ABC):
    """Trainer side, one per trainer rank. Rank 0 is the root that talks to the engines; other ranks only
    take part where the transport needs them (ipc: each shares its own GPU's copy)."""

    kind: ClassVar[str] = "abstract"
    every_rank_packs: ClassVar[bool] = False  # do ranks other than 0 fill bucket buffers?

    def __init__(self, rank: int, device: torch.device, timeout_s: float) -> None:
        self.rank, self.device, self.timeout_s = rank, device, timeout_s
        self.broken = ""

    @property
    def buffer_device(self) -> torch.device:
        return torch.device("cpu")

    def open(self, num_receivers: int, host: str, sender_gpus: list[str]) -> ChannelSpec:
        return ChannelSpec(kind=self.kind, world_size=1 + num_receivers, host=host, timeout_s=self.timeout_s,
                           sender_gpus=sender_gpus)

    def connect(self) -> dict[str, Any]:
        """Join the group; blocks until every receiver has joined (they join at the same time)."""
        return {}

    @abstractmethod
    def begin(self, version: int, plan: list[Bucket], probe: bool) -> None: ...

    @abstractmethod
    def send_bucket(self, index: int, buf: torch.Tensor | None) -> None:
        """Send bucket `index` of the plan; `buf` is its filled uint8 buffer (None on ranks that do not pack)."""

    @abstractmethod
    def end(self) -> WeightHandle:
        """Wait until every bucket has left; returns the handle (meaningful on rank 0)."""

    def release(self, handle: WeightHandle) -> None:
        """Free what `send` held once every engine has loaded it."""

    def close(self) -> None:
        pass

    def _check(self) -> None:
        if self.broken:
            raise ChannelError(f"the {self.kind} weight channel broke earlier ({self.broken}); it must be reopened")


class ChannelReceiver(ABC):
    """Engine side, one per vLLM worker process; joins the channel when built."""

    kind: ClassVar[str] = "abstract"

    def __init__(self, spec: ChannelSpec, rank: int, device: torch.device) -> None:
        self.spec, self.rank, self.device = spec, rank, device
        self.stats: dict[str, Any] = {}

    @abstractmethod
    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one sync, as they arrive; `self.stats` then holds version, bytes and recv_s."""

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- shm
class ShmSender(ChannelSender):
    """Rank 0 writes every bucket's tensors to one safetensors file in /dev/shm (a temp dir without it)."""

    kind = "shm"

    def __init__(self, rank: int, device: torch.device, timeout_s: float, tag: str = "") -> None:
        super().__init__(rank, device, timeout_s)
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.dir = base / f"streamrl-weights-{tag or os.getpid()}"
        self.tensors: dict[str, torch.Tensor] = {}

    def begin(self, version: int, plan: list[Bucket], probe: bool) -> None:
        self.version, self.plan, self.probe, self.tensors = version, plan, probe, {}

    def send_bucket(self, index: int, buf: torch.Tensor | None) -> None:
        if buf is not None:
            for name, t in unpack(buf.cpu(), self.plan[index]):  # own storage each: safetensors refuses views
                self.tensors[name if not self.probe else f"probe.{index}.{name}"] = t.clone()

    def end(self) -> WeightHandle:
        from safetensors.torch import save_file

        if self.rank != 0:
            return WeightHandle(kind=self.kind, version=self.version)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"v{self.version}{'-probe' if self.probe else ''}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(self.tensors, str(tmp))
        tmp.rename(path)
        nbytes = sum(b.nbytes for b in self.plan)
        n = len(self.tensors)
        self.tensors = {}
        return WeightHandle(kind=self.kind, version=self.version, path=str(path), num_tensors=n, nbytes=nbytes,
                            probe=self.probe)

    def release(self, handle: WeightHandle) -> None:
        if handle.path:
            Path(handle.path).unlink(missing_ok=True)

    def close(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.glob("*"):
                p.unlink(missing_ok=True)
            self.dir.rmdir()


class ShmFileSender:
    """A whole set of named tensors as one shm file that any engine loads (`update_weights(handle)`), with
    no channel to open: for tests and tools outside the trainer."""

    def __init__(self, tag: str) -> None:
        self.inner = ShmSender(0, torch.device("cpu"), 0.0, tag)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightHandle:
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in named_tensors}
        self.inner.dir.mkdir(parents=True, exist_ok=True)
        path = self.inner.dir / f"v{version}.safetensors"
        save_file(tensors, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").rename(path)
        return WeightHandle(kind="shm", version=version, path=str(path), num_tensors=len(tensors),
                            nbytes=sum(t.numel() * t.element_size() for t in tensors.values()))

    def release(self, handle: WeightHandle) -> None:
        self.inner.release(handle)

    def close(self) -> None:
        self.inner.close()


class ShmReceiver(ChannelReceiver):
    kind = "shm"

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        self.stats = {"version": handle.version, "bytes": 0, "recv_s": 0.0}
        with safe_open(handle.path, framework="pt") as f:
            for name in f.keys():
                t0 = time.perf_counter()
                t = f.get_tensor(name)
                self.stats["recv_s"] += time.perf_counter() - t0
                self.stats["bytes"] += t.numel() * t.element_size()
                yield name, t


# --------------------------------------------------------------------------- the control group (gloo)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ControlGroup:
    """A gloo group of the sender (rank 0) and every engine worker on its own TCPStore: it does not touch
    torch.distributed's default group of either side, and every operation has the channel's timeout."""

    def __init__(self, store: Any, rank: int, size: int, timeout_s: float, kind: str) -> None:
        import torch.distributed as dist

        self.rank, self.size, self.timeout_s, self.kind, self.store = rank, size, timeout_s, kind, store
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("streamrl-weights/gloo", store), rank, size,
                                        datetime.timedelta(seconds=timeout_s))

    @staticmethod
    def serve(host: str, size: int, timeout_s: float) -> Any:
        """Rank 0: open the TCPStore the members rendezvous on (an OS-chosen port: no race)."""
        import torch.distributed as dist

        return dist.TCPStore(host, 0, size, True, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    @staticmethod
    def client(spec: ChannelSpec) -> Any:
        import torch.distributed as dist

        try:
            return dist.TCPStore(spec.host, spec.port, spec.world_size, False,
                                 timeout=datetime.timedelta(seconds=spec.timeout_s))
        except Exception as exc:
            raise ChannelError(f"could not reach the trainer's weight-channel store at {spec.host}:{spec.port} "
                               f"within {spec.timeout_s:.0f} s: {exc}") from exc

    def broadcast(self, t: torch.Tensor) -> Any:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([t], opts)

    def wait(self, work: Any, what: str) -> None:
        t0 = time.monotonic()
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as exc:
            whom = "the trainer (rank 0)" if self.rank else f"engine workers (ranks 1..{self.size - 1})"
            raise ChannelError(f"{self.kind} weight channel: {what} failed after {time.monotonic() - t0:.1f} s "
                               f"(timeout {self.timeout_s:.0f} s) waiting for {whom}: {exc}") from exc

    def send_bytes(self, raw: bytes, what: str) -> None:
        n = torch.tensor([len(raw)], dtype=torch.int64)
        self.wait(self.broadcast(n), f"{what} (length)")
        self.wait(self.broadcast(torch.frombuffer(bytearray(raw), dtype=torch.uint8)), what)

    def recv_bytes(self, what: str) -> bytes:
        n = torch.zeros(1, dtype=torch.int64)
        self.wait(self.broadcast(n), f"{what} (length)")
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        self.wait(self.broadcast(buf), what)
        return buf.numpy().tobytes()

    def barrier(self, what: str) -> None:
        import torch.distributed as dist

        self.wait(self.pg.allreduce([torch.zeros(1)], dist.AllreduceOptions()), what)


def _member_key(rank: int) -> str:
    return f"streamrl-weights/member/{rank}"


def _await_members(store: Any, size: int, timeout_s: float, kind: str) -> list[dict[str, Any]]:
    """Rank 0: wait until every receiver has registered; name the missing ones on timeout."""
    keys = [_member_key(r) for r in range(1, size)]
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r, k in zip(range(1, size), keys) if not store.check([k])]
        if not missing:
            return [json.loads(store.get(k)) for k in keys]
        if time.monotonic() > deadline:
            raise ChannelError(f"Timed out after {timeout_s:.0f} s waiting for {kind} weight-channel ranks "
                               f"{missing} (engine workers) to join; {size - 1 - len(missing)} of {size - 1} joined. "
                               "Did every rollout engine start and call init_weight_channel?")
        time.sleep(0.05)


def gpu_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


# --------------------------------------------------------------------------- streaming senders
class StreamSender(ChannelSender):
    """Shared by gloo / nccl / ipc: rank 0 owns the control group and sends the header of every sync."""

    def __init__(self, rank: int, device: torch.device, timeout_s: float) -> None:
        super().__init__(rank, device, timeout_s)
        self.store: Any = None
        self.group: ControlGroup | None = None
        self.spec: ChannelSpec | None = None

    def open(self, num_receivers: int, host: str, sender_gpus: list[str]) -> ChannelSpec:
        spec = super().open(num_receivers, host, sender_gpus)
        if self.rank == 0:
            self.store = ControlGroup.serve(host, spec.world_size, self.timeout_s)
            spec.port = self.store.port
        self.spec = spec
        return spec

    def connect(self) -> dict[str, Any]:
        if self.rank != 0:
            return {}
        assert self.spec is not None and self.store is not None, "open() first"
        members = _await_members(self.store, self.spec.world_size, self.timeout_s, self.kind)
        self._check_members(members)
        self.group = ControlGroup(self.store, 0, self.spec.world_size, self.timeout_s, self.kind)
        return {"members": members}

    def _check_members(self, members: list[dict[str, Any]]) -> None:
        pass

    def begin(self, version: int, plan: list[Bucket], probe: bool) -> None:
        self._check()
        self.version, self.plan, self.probe = version, plan, probe
        if self.rank == 0:
            self._guard(lambda: self._root().send_bytes(_plan_to_json(version, probe, plan), "the sync header"))
            self._guard(lambda: self._root().barrier("every receiver's arrival"))

    def _root(self) -> ControlGroup:
        if self.group is None:
            raise ChannelError(f"the {self.kind} weight channel is not connected: call connect() after open()")
        return self.group

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:
            self.broken = str(exc)[:200]
            raise

    def end(self) -> WeightHandle:
        return WeightHandle(kind=self.kind, version=self.version, num_tensors=sum(len(b.tensors) for b in self.plan),
                            nbytes=sum(b.nbytes for b in self.plan), probe=self.probe)

    def close(self) -> None:
        self.group = None
        self.store = None


class GlooSender(StreamSender):
    """Buckets are broadcast in the control group itself; at most two in flight (fill one, send the other)."""

    kind = "gloo"

    def begin(self, version: int, plan: list[Bucket], probe: bool) -> None:
        super().begin(version, plan, probe)
        self.pending: list[tuple[Any, torch.Tensor, int]] = []

    def send_bucket(self, index: int, buf: torch.Tensor | None) -> None:
        if self.rank != 0:
            return
        assert buf is not None
        self._guard(lambda: self._drain(1))
        work = self._guard(lambda: self._root().broadcast(buf))
        self.pending.append((work, buf, index))

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            work, _, index = self.pending.pop(0)
            self._root().wait(work, f"bucket {index + 1}/{len(self.plan)} of version {self.version}")

    def end(self) -> WeightHandle:
        if self.rank == 0:
            self._guard(lambda: self._drain(0))
        return super().end()


class GlooReceiver(ChannelReceiver):
    kind = "gloo"

    def __init__(self, spec: ChannelSpec, rank: int, device: torch.device) -> None:
        super().__init__(spec, rank, device)
        self.store = ControlGroup.client(spec)
        self.store.set(_member_key(rank), json.dumps(self._member_info()))
        self.group = ControlGroup(self.store, rank, spec.world_size, spec.timeout_s, spec.kind)

    def _member_info(self) -> dict[str, Any]:
        return {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "gpu": gpu_uuid(self.device)}

    def _header(self) -> tuple[int, bool, list[Bucket]]:
        t0 = time.perf_counter()
        version, probe, plan = _plan_from_json(self.group.recv_bytes("the sync header"))
        self.group.barrier("every receiver's arrival")
        self.stats = {"version": version, "probe": probe, "bytes": sum(b.nbytes for b in plan),
                      "tensors": sum(len(b.tensors) for b in plan), "recv_s": time.perf_counter() - t0}
        return version, probe, plan

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        _, _, plan = self._header()
        bufs = [torch.empty(b.nbytes, dtype=torch.uint8) for b in plan[:1]]
        works = [self.group.broadcast(bufs[0])] if plan else []
        for k, bucket in enumerate(plan):
            t0 = time.perf_counter()
            self.group.wait(works[k], f"bucket {k + 1}/{len(plan)} of version {self.stats['version']}")
            if k + 1 < len(plan):  # post the next receive before the loader runs on this one
                bufs.append(torch.empty(plan[k + 1].nbytes, dtype=torch.uint8))
                works.append(self.group.broadcast(bufs[k + 1]))
            self.stats["recv_s"] += time.perf_counter() - t0
            buf, bufs[k] = bufs[k], None  # the loader may keep views until its layer is complete
            yield from unpack(buf, bucket)


# --------------------------------------------------------------------------- nccl
def _cuda_wait(event: Any, timeout_s: float, what: str) -> None:
    """Poll a CUDA event with a deadline: an NCCL operation has no timeout of its own."""
    t0 = time.monotonic()
    while not event.query():
        if time.monotonic() - t0 > timeout_s:
            raise ChannelError(f"nccl weight channel: {what} did not complete within {timeout_s:.0f} s; "
                               "is every engine worker (and the trainer's rank 0) alive?")
        time.sleep(0.0002)


def _nccl_group(spec: ChannelSpec, rank: int, device: torch.device) -> Any:
    """vLLM's NCCL communicator over a StatelessProcessGroup: no torch.distributed global state."""
    from contextlib import nullcontext

    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    try:  # vLLM >= 0.30 pins NCCL settings in its processes; the shared group must be built without them
        from vllm.utils.nccl import unpinned_nccl_env
    except ImportError:
        unpinned_nccl_env = nullcontext
    pg = StatelessProcessGroup.create(host=spec.host, port=spec.nccl_port, rank=rank, world_size=spec.world_size,
                                      store_timeout=int(spec.timeout_s))
    with unpinned_nccl_env():
        return PyNcclCommunicator(pg, device=device)


class NcclSender(StreamSender):
    """Buckets are broadcast by NCCL on a side stream, so filling bucket k+1 overlaps sending bucket k."""

    kind = "nccl"

    @property
    def buffer_device(self) -> torch.device:
        return self.device

    def open(self, num_receivers: int, host: str, sender_gpus: list[str]) -> ChannelSpec:
        spec = super().open(num_receivers, host, sender_gpus)
        if self.rank == 0:
            spec.nccl_port = free_port()
        return spec

    def _check_members(self, members: list[dict[str, Any]]) -> None:
        mine = gpu_uuid(self.device)
        shared = [m["rank"] for m in members if m["gpu"] and m["gpu"] == mine]
        if shared:
            raise ChannelError(f"nccl weight channel: engine worker ranks {shared} share GPU {mine} with the "
                               "trainer's rank 0; NCCL cannot hold two ranks on one GPU: use weight_transport=ipc")

    def connect(self) -> dict[str, Any]:
        out = super().connect()
        if self.rank == 0:
            assert self.spec is not None
            self.comm = _nccl_group(self.spec, 0, self.device)
            self.stream = torch.cuda.Stream(device=self.device)
        return out

    def begin(self, version: int, plan: list[Bucket], probe: bool) -> None:
        super().begin(version, plan, probe)
        self.pending: list[tuple[Any, torch.Tensor, int]] = []

    def send_bucket(self, index: int, buf: torch.Tensor | None) -> None:
        if self.rank != 0:
            return
        assert buf is not None
        self._guard(lambda: self._drain(1))
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            self.comm.broadcast(buf, src=0, stream=self.stream)
        buf.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        self.pending.append((done, buf, index))

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            done, _, index = self.pending.pop(0)
            _cuda_wait(done, self.timeout_s, f"bucket {index + 1}/{len(self.plan)} of version {self.version}")

    def end(self) -> WeightHandle:
        if self.rank == 0:
            self._guard(lambda: self._drain(0))
        return super().end()


class NcclReceiver(GlooReceiver):
    kind = "nccl"

    def __init__(self, spec: ChannelSpec, rank: int, device: torch.device) -> None:
        super().__init__(spec, rank, device)
        self.comm = _nccl_group(spec, rank, device)
        self.stream = torch.cuda.Stream(device=device)

    def _post(self, bucket: Bucket) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            self.comm.broadcast(buf, src=0, stream=self.stream)
        buf.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        return buf, done

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        version, _, plan = self._header()
        posted = [self._post(plan[0])] if plan else []
        for k, bucket in enumerate(plan):
            t0 = time.perf_counter()
            if k + 1 < len(plan):  # the next bucket lands while the loader works on this one
                posted.append(self._post(plan[k + 1]))
            buf, done = posted[k]
            posted[k] = None  # type: ignore[call-overload]
            _cuda_wait(done, self.spec.timeout_s, f"bucket {k + 1}/{len(plan)} of version {version}")
            torch.cuda.current_stream(self.device).wait_event(done)
            self.stats["recv_s"] += time.perf_counter() - t0
            yield from unpack(buf, bucket)


# --------------------------------------------------------------------------- ipc
class IpcSender(StreamSender):
    """Every trainer rank fills its bucket on its own GPU and shares it by a CUDA IPC handle; rank 0 gathers
    the handles (trainer group) and broadcasts them (control group); each engine worker copies the bucket
    from the trainer GPU it shares, then all acknowledge, and the trainer ranks drop their buffers."""

    kind = "ipc"
    every_rank_packs = True

    @property
    def buffer_device(self) -> torch.device:
        return self.device

    def _check_members(self, members: list[dict[str, Any]]) -> None:
        assert self.spec is not None
        alone = [f"{m['rank']} ({m['gpu'] or 'no GPU'})" for m in members if m["gpu"] not in self.spec.sender_gpus]
        if alone:
            raise ChannelError(f"ipc weight channel: engine worker ranks {', '.join(alone)} share no GPU with a "
                               f"trainer rank (trainer GPUs: {self.spec.sender_gpus}); use weight_transport=nccl")

    def send_bucket(self, index: int, buf: torch.Tensor | None) -> None:
        import torch.distributed as dist
        from torch.multiprocessing.reductions import reduce_tensor

        assert buf is not None
        torch.cuda.current_stream(self.device).synchronize()  # the bytes are in place before anyone maps them
        mine = {gpu_uuid(self.device): reduce_tensor(buf)[1]}
        multi = dist.is_initialized() and dist.get_world_size() > 1
        if multi:
            gathered: list[Any] = [None] * dist.get_world_size() if self.rank == 0 else []
            dist.gather_object(mine, gathered if self.rank == 0 else None, dst=0)
        if self.rank == 0:
            handles: dict[str, Any] = {}
            for h in (gathered if multi else [mine]):
                handles.update(h)
            what = f"bucket {index + 1}/{len(self.plan)} of version {self.version}"
            self._guard(lambda: self._root().send_bytes(pickle.dumps(handles), f"the IPC handles of {what}"))
            self._guard(lambda: self._root().barrier(f"the engines' copy of {what}"))
        if multi:
            dist.barrier()  # every rank keeps its buffer until the engines have copied it
        del buf

    def end(self) -> WeightHandle:
        torch.cuda.ipc_collect()
        return super().end()


class IpcReceiver(GlooReceiver):
    kind = "ipc"

    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        version, _, plan = self._header()
        me = gpu_uuid(self.device)
        for k, bucket in enumerate(plan):
            t0 = time.perf_counter()
            what = f"bucket {k + 1}/{len(plan)} of version {version}"
            handles = pickle.loads(self.group.recv_bytes(f"the IPC handles of {what}"))  # from our own trainer
            if me not in handles:
                raise ChannelError(f"ipc weight channel: no trainer buffer on this engine's GPU {me} "
                                   f"(trainer GPUs: {sorted(handles)})")
            args = list(handles[me])
            args[6] = self.device.index  # the device index as this process numbers it
            shared = rebuild_cuda_tensor(*args)
            own = torch.empty_like(shared)
            own.copy_(shared)  # one device copy: the loader may keep views past the next bucket
            torch.cuda.current_stream(self.device).synchronize()
            del shared
            self.group.barrier(f"the engines' copy of {what}")
            self.stats["recv_s"] += time.perf_counter() - t0
            yield from unpack(own, bucket)


# --------------------------------------------------------------------------- factories
SENDERS: dict[str, type[ChannelSender]] = {"shm": ShmSender, "gloo": GlooSender, "nccl": NcclSender, "ipc": IpcSender}
RECEIVERS: dict[str, type[ChannelReceiver]] = {"shm": ShmReceiver, "gloo": GlooReceiver, "nccl": NcclReceiver,
                                               "ipc": IpcReceiver}


def make_sender(kind: str, rank: int, device: torch.device, timeout_s: float) -> ChannelSender:
    if kind not in SENDERS:
        raise ValueError(f"unknown weight transport {kind!r}; valid: {', '.join(SENDERS)} (or auto)")
    return SENDERS[kind](rank, device, timeout_s)


def make_receiver(spec: ChannelSpec, rank: int, device: torch.device) -> ChannelReceiver:
    """Join the channel `spec` describes as group rank `rank` (blocks until every member has joined)."""
    if spec.kind not in RECEIVERS:
        raise ValueError(f"unknown weight transport {spec.kind!r}; valid: {', '.join(RECEIVERS)}")
    return RECEIVERS[spec.kind](spec, rank, device)
