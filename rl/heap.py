"""Python's garbage collector in long-lived actors.

A process that imported torch, transformers and vLLM tracks ~600k objects; a full collection walks them
all (330 ms on the 2-core dev box). The rollout worker makes a dict and an object per generated token for
vLLM's logprobs, so full collections come often while it generates, and each one stops that actor's event
loop, weight updates included. `settle()` after start-up moves every object made so far out of the
collector's view (`gc.freeze`): a full collection then walks only what the run made since. `GcClock` counts
the collector's pauses so a stall can be told from one.
"""

from __future__ import annotations

import gc
import time


def settle() -> None:
    """Collect once, then freeze what is left (call at the end of an actor's start-up)."""
    gc.collect()
    gc.freeze()


class GcClock:
    """Seconds spent in the collector in this process, and the number of full collections, since start."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.full += info.get("generation") == 2
