"""The trainer's half of a weight sync: FSDP2 shards -> full tensors -> engine dtype -> buckets -> channel.

Every trainer rank walks the model's state dict in the same order and calls `full_tensor()` on each
parameter (an all-gather over the trainer group, so every rank must take part); the ranks that pack
(rank 0, or every rank for CUDA IPC) cast each full tensor to the engine dtype straight into the bucket's
flat buffer, and the channel (`rl.core.transport`) sends the bucket while the next one is filled. Memory held
beyond the model is about two buckets (`rollout.weight_bucket_mb`), never the whole model (except shm,
which writes one file).

With LoRA (trainer/lora.py) the plan holds only the modules the adapters change, each weight merged
(W + scale * B @ A) from its gathered base and adapter tensors, under the base model's names.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rl.core.transport import Bucket, ChannelSpec, WeightHandle, gpu_uuid, make_sender, plan_buckets, tensor_view
from trainer.lora import SyncTensor, has_lora, merged, sync_tensors


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (an all-gather: every rank calls); a one-rank mesh has it."""
    if not hasattr(t, "full_tensor"):
        return t
    return t.to_local() if t.device_mesh.size() == 1 else t.full_tensor()


class WeightSender:
    """One per trainer rank; built by `open_weight_channel` and used by every sync after it."""

    def __init__(self, model: torch.nn.Module, rank: int, device: torch.device, engine_dtype: torch.dtype,
                 kind: str, bucket_bytes: int, timeout_s: float) -> None:
        self.model, self.rank, self.device, self.engine_dtype = model, rank, device, engine_dtype
        self.channel = make_sender(kind, rank, device, timeout_s)
        # engine name -> how to make it: a state-dict entry, or a merged LoRA weight
        self.sources: dict[str, SyncTensor] = {t.name: t for t in sync_tensors(model)} if has_lora(model) else \
            {n: SyncTensor(n, n) for n in self._names()}
        self.names = list(self.sources)
        state = model.state_dict()
        cast = [(n, engine_dtype if state[t.weight].is_floating_point() else state[t.weight].dtype,
                 tuple(state[t.weight].shape)) for n, t in self.sources.items()]
        self.plan: list[Bucket] = plan_buckets(cast, bucket_bytes)
        self.nbytes = sum(b.nbytes for b in self.plan)

    def _names(self) -> list[str]:
        """State-dict keys, each parameter once (tied embeddings travel once; vLLM ties them again)."""
        first = {n for n, _ in self.model.named_parameters()}  # one name per parameter object
        every = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        return [n for n in self.model.state_dict() if n in first or n not in every]

    @property
    def kind(self) -> str:
        return self.channel.kind

    def open(self, num_receivers: int, host: str) -> ChannelSpec:
        """Every rank: learn the trainer GPUs (a collective on CUDA); rank 0 opens the rendezvous."""
        gpus = [gpu_uuid(self.device)]
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            out: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(out, gpus[0])
            gpus = list(out)
        return self.channel.open(num_receivers, host, [g for g in gpus if g])

    def connect(self) -> dict[str, Any]:
        return self.channel.connect()

    def send(self, version: int, probe: bool = False) -> WeightHandle:
        """Every rank calls it (the gathers are collectives). `probe` moves as many bytes, unfilled and
        ungathered, through the same channel: the link baseline. Bucket 0 is filled before the header goes
        out, so its gather overlaps the engines' pause."""
        state = None if probe else self.model.state_dict()
        t_start = time.perf_counter()
        gather_s, t_ready, wait_receivers = 0.0, t_start, 0.0
        for k in range(len(self.plan)):
            t0 = time.perf_counter()
            buf = self._fill(k, state)
            gather_s += time.perf_counter() - t0
            if k == 0:
                t_begin = time.perf_counter()
                self.channel.begin(version, self.plan, probe)  # returns when every receiver is there
                t_ready = time.perf_counter()
                wait_receivers = t_ready - t_begin
            self.channel.send_bucket(k, buf)
            del buf
        if not self.plan:
            self.channel.begin(version, self.plan, probe)
        handle = self.channel.end()
        t_end = time.perf_counter()
        handle.meta.update(gather_s=gather_s, send_s=t_end - t_start - gather_s, transfer_s=t_end - t_ready,
                           wait_receivers_s=wait_receivers,
                           buckets=len(self.plan), trainer_total_s=t_end - t_start)
        return handle

    def _fill(self, k: int, state: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        """Bucket k's buffer on the ranks that pack (None elsewhere), with every full tensor cast into it."""
        packs = self.rank == 0 or self.channel.every_rank_packs
        bucket = self.plan[k]
        buf = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.channel.buffer_device) if packs else None
        if state is not None:
            for spec in bucket.tensors:
                full = merged(self.sources[spec.name], state, _full)
                if buf is not None:
                    tensor_view(buf, spec).copy_(full)  # the cast to the engine dtype happens here
                del full
        return buf

    def release(self, handle: WeightHandle) -> None:
        self.channel.release(handle)

    def close(self) -> None:
        self.channel.close()
