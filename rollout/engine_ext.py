"""Methods added to every vLLM worker process (vLLM's `worker_extension_cls`), called by `collective_rpc`.

They run inside the engine's worker, between engine steps, so a weight load never races a forward pass.
Tensors do not travel as RPC arguments (vLLM's RPC serialisation drops them): the argument is a small
handle and the bytes come through the weight channel (`rl.transport`).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch


class StreamRLWorkerExtension:
    """Mixed into vLLM's Worker class; `self` is the worker."""

    def streamrl_load_weights(self, handle: dict[str, Any]) -> dict[str, Any]:
        from rl.transport import WeightHandle, receive

        t0 = time.perf_counter()
        weights = receive(WeightHandle(**handle))
        if hasattr(self, "reload_weights"):
            # restores the load-time layout (the CPU backend repacks linear weights), loads, repacks
            self.reload_weights(weights_iterator=weights)
        else:
            self.model_runner.model.load_weights(weights)
        return {"seconds": time.perf_counter() - t0, "version": handle["version"]}

    def streamrl_weight_digest(self) -> str:
        """A digest of every parameter, for tests that two engines hold the same weights."""
        h = hashlib.sha256()
        for name, p in sorted(self.model_runner.model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def streamrl_device(self) -> str:
        return str(torch.device(self.device) if hasattr(self, "device") else "cpu")
