"""Methods added to every vLLM worker process (vLLM's `worker_extension_cls`), called by `collective_rpc`.

They run inside the engine's worker, between engine steps, so a weight load never races a forward pass.
Tensors do not travel as RPC arguments (vLLM's RPC serialisation drops them): the arguments are small
dicts (a `ChannelSpec`, a `WeightHandle`) and the bytes come through the weight channel (`rl.core.transport`).
"""

from __future__ import annotations

import hashlib
import inspect
import time
from typing import Any, Iterator

import torch


class StreamRLWorkerExtension:
    """Mixed into vLLM's Worker class; `self` is the worker. Attributes of ours start with `_streamrl`."""

    def streamrl_join_weight_channel(self, spec: dict[str, Any], first_rank: int) -> dict[str, Any]:
        """Join the trainer's weight channel as group rank `first_rank` + this worker's tensor-parallel rank
        (blocks until every member has joined; replaces a channel joined before)."""
        from rl.core.transport import ChannelSpec, gpu_uuid, make_receiver

        old = getattr(self, "_streamrl_receiver", None)
        if old is not None:
            old.close()
            self._streamrl_receiver = None
        rank = first_rank + int(getattr(self, "rank", 0))
        device = self._streamrl_torch_device()
        t0 = time.perf_counter()
        self._streamrl_receiver = make_receiver(ChannelSpec(**spec), rank, device)
        return {"rank": rank, "device": str(device), "gpu": gpu_uuid(device), "join_s": time.perf_counter() - t0}

    def streamrl_load_weights(self, handle: dict[str, Any]) -> dict[str, Any]:
        """Receive one sync and load it (a probe is received and dropped). Returns the version loaded and
        where the time went: recv_s waiting for bytes, the rest in vLLM's loader."""
        from rl.core.transport import ChannelSpec, WeightHandle, make_receiver

        h = WeightHandle(**handle)
        recv = getattr(self, "_streamrl_receiver", None)
        if recv is None or recv.kind != h.kind:
            if h.kind != "shm":
                raise RuntimeError(f"this engine worker has not joined a {h.kind} weight channel "
                                   "(the controller calls init_weight_channel after the engine starts)")
            recv = make_receiver(ChannelSpec(kind="shm"), 0, self._streamrl_torch_device())
        t0 = time.perf_counter()
        weights = recv.receive(h)
        if h.probe:
            for _ in weights:
                pass
        else:
            self._streamrl_load(weights)
        if not hasattr(self, "_streamrl_heap"):
            from rl.core.heap import HeapTrim

            self._streamrl_heap = HeapTrim()
        self._streamrl_heap.maybe()  # give freed heap back to the system every 30 s (rl/core/heap.py)
        total = time.perf_counter() - t0
        st = recv.stats
        return {"seconds": total, "version": st.get("version", h.version), "recv_s": st.get("recv_s", 0.0),
                "load_s": total - st.get("recv_s", 0.0), "bytes": st.get("bytes", 0), "probe": h.probe}

    def _streamrl_load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """On CUDA with an unquantized model: the model's own `load_weights` (it copies each tensor, or its
        tensor-parallel slice, into the live parameter; nothing was repacked at start). Elsewhere vLLM's
        in-place reload, which restores the load-time layout first (the CPU backend repacks its linears
        and a quantized model's weights are processed after loading), loads, and processes again: on CUDA
        that round trip cost 0.105 s of a 0.166 s sync of Qwen2-0.5B (docs/benchmarks.md)."""
        model = self.model_runner.model
        if self._streamrl_torch_device().type == "cuda" and self.vllm_config.model_config.quantization is None:
            model.load_weights(weights)
            return
        reload = getattr(self, "reload_weights", None)
        params = inspect.signature(reload).parameters.values() if reload is not None else []
        if any(p.name == "weights_iterator" or p.kind is p.VAR_KEYWORD for p in params):
            try:
                reload(weights_iterator=weights)
                return
            except TypeError as exc:  # an older vLLM whose model runner reloads from disk only
                if "weights_iterator" not in str(exc):
                    raise
        model.load_weights(weights)

    def _streamrl_torch_device(self) -> torch.device:
        dev = getattr(self, "device", None)
        return torch.device(dev) if dev is not None else torch.device("cpu")

    def streamrl_weight_digest(self) -> str:
        """A digest of every parameter, for tests that two engines hold the same weights."""
        h = hashlib.sha256()
        for name, p in sorted(self.model_runner.model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def streamrl_device(self) -> str:
        return str(self._streamrl_torch_device())
