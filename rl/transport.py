"""The weight channel between trainer and rollout engines: one small interface, one implementation per link.

The trainer's rank 0 calls `sender.send(named_tensors, version)` and gets a `WeightHandle`, a small
picklable description of where the bytes are; each rollout engine's worker process calls
`receive(handle)` and gets an iterator of (name, tensor) that vLLM's weight loader consumes (vLLM cuts
each full tensor into the tensor-parallel shard it owns, which is the reshard).

Implemented here: `shm`, a safetensors file in shared memory (/dev/shm): on one machine one write is read
by every engine, with no copy through Ray.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch


@dataclass
class WeightHandle:
    kind: str
    version: int
    path: str = ""
    num_tensors: int = 0
    nbytes: int = 0
    meta: dict = field(default_factory=dict)


class WeightSender:
    """Trainer side of the channel."""

    kind = "abstract"

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightHandle:
        raise NotImplementedError

    def release(self, handle: WeightHandle) -> None:
        """Free what `send` held once every engine has loaded it."""


class ShmFileSender(WeightSender):
    """Writes the full weights once to a safetensors file in /dev/shm (or a temp dir without it)."""

    kind = "shm"

    def __init__(self, tag: str) -> None:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.dir = base / f"streamrl-{tag}-{os.getpid()}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightHandle:
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous() for name, t in named_tensors}
        path = self.dir / f"v{version}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(path)
        return WeightHandle(kind=self.kind, version=version, path=str(path), num_tensors=len(tensors),
                            nbytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                            meta={"written_at": time.time()})

    def release(self, handle: WeightHandle) -> None:
        Path(handle.path).unlink(missing_ok=True)

    def close(self) -> None:
        for p in self.dir.glob("*"):
            p.unlink(missing_ok=True)
        self.dir.rmdir()


def receive(handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
    """Engine side: the tensors a handle points at, one at a time."""
    if handle.kind == "shm":
        from safetensors import safe_open

        with safe_open(handle.path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    raise ValueError(f"unknown weight transport {handle.kind!r}; valid: shm")


def make_sender(kind: str, tag: str) -> WeightSender:
    if kind == "shm":
        return ShmFileSender(tag)
    raise ValueError(f"unknown weight transport {kind!r}; valid: shm")
