"""Python's garbage collector in long-lived actors.

A process that imported torch, transformers and vLLM tracks ~600k objects; a full collection walks them
all (330 ms on the 2-core dev box). The rollout worker makes a dict and an object per generated token for
vLLM's logprobs, so full collections come often while it generates, and each one stops that actor's event
loop, weight updates included. `settle()` after start-up moves every object made so far out of the
collector's view (`gc.freeze`): a full collection then walks only what the run made since. `GcClock` counts
the collector's pauses so a stall can be told from one. `HeapTrim` hands the C heap's free memory back to
the system now and then, so resident memory counts what the process uses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

TRIM_EVERY_S = 30.0  # HeapTrim's default period


def settle() -> None:
    """Collect once, then freeze what is left (call at the end of an actor's start-up)."""
    gc.collect()
    gc.freeze()


class HeapTrim:
    """glibc's `malloc_trim(0)`, at most every `every_s` seconds (`maybe()`); a no-op without glibc.

    glibc keeps what a process frees for later, so RSS counts memory the process no longer uses. In the CPU
    default the vLLM worker's heap takes about 100 MB more every 30 s (weight loads, generation); each trim
    gives it back (heap 590 -> 485 MB), which lowers the worker's RSS but not its slow climb (issue 19)."""

    def __init__(self, every_s: float = TRIM_EVERY_S) -> None:
        self.every_s = every_s
        self.last = time.monotonic()
        self.seconds = 0.0  # spent trimming, in total
        name = ctypes.util.find_library("c")
        try:
            self._trim = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
            self._trim = None

    def maybe(self) -> bool:
        """Trim if `every_s` passed since the last trim; True if it trimmed."""
        now = time.monotonic()
        if self._trim is None or now - self.last < self.every_s:
            return False
        self._trim(0)
        self.last = time.monotonic()
        self.seconds += self.last - now
        return True


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


class LoopWatch:
    """How long this process's asyncio loop was kept from running, and where it was stuck.

    A task on the loop beats every `beat_s`; a thread checks the beat. When the loop has not beaten for
    `stall_s`, the thread takes the loop thread's Python stack once per stall (`sys._current_frames`), so a
    late actor call (a weight update that reaches the actor a second late) can be traced to the code that
    held the loop. A stall inside C code that holds the GIL is seen when it ends; `GcClock` counts the
    collector's share."""

    def __init__(self, beat_s: float = 0.02, stall_s: float = 0.25, keep: int = 8) -> None:
        self.beat_s, self.stall_s, self.keep = beat_s, stall_s, keep
        self.lag_max = 0.0  # the longest gap between beats since the last `take()`
        self.stalls: list[dict] = []  # {"lag_s", "at", "stack"}, at most `keep` since the last `take()`
        self._beat = time.monotonic()
        self._loop_thread = 0
        self._task = None
        self._stop = False

    def start(self) -> None:
        """Call from a coroutine on the loop to watch."""
        import asyncio
        import threading

        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._beats())
        threading.Thread(target=self._watch, name="streamrl-loop-watch", daemon=True).start()

    async def _beats(self) -> None:
        import asyncio

        while not self._stop:
            now = time.monotonic()
            self.lag_max = max(self.lag_max, now - self._beat - self.beat_s)
            self._beat = now
            await asyncio.sleep(self.beat_s)

    def _watch(self) -> None:
        import sys
        import traceback

        caught = 0.0
        while not self._stop:
            time.sleep(self.beat_s * 2)
            beat = self._beat
            if time.monotonic() - beat > self.stall_s and beat != caught:
                caught = beat
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None and len(self.stalls) < self.keep:
                    self.stalls.append({"lag_s": time.monotonic() - beat, "at": time.time(),
                                        "stack": "".join(traceback.format_stack(frame)[-12:])})

    def take(self) -> dict:
        """The longest lag and the stalls seen since the last call."""
        out = {"lag_max_s": self.lag_max, "stalls": self.stalls}
        self.lag_max, self.stalls = 0.0, []
        return out

    def stop(self) -> None:
        self._stop = True
