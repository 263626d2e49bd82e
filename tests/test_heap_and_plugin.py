"""rl/core/heap.py (the collector's clock, the frozen start-up heap) and rollout/vllm_plugin.py (vLLM's message
queue readers nap instead of spinning), on the real gc module and the real vLLM package."""

import gc
import os
import subprocess
import sys
import time

from rl.core.heap import GcClock, HeapTrim, settle

PLUGIN_CHECK = """
import time
from importlib.metadata import entry_points
from vllm.distributed.device_communicators import shm_broadcast
from vllm.distributed.utils import sched_yield
assert any(e.value == "rollout.vllm_plugin:register" for e in entry_points(group="vllm.general_plugins")), "not registered"
from vllm.plugins import load_general_plugins
load_general_plugins()  # as every vLLM process does at start
patched = shm_broadcast.sched_yield is not sched_yield
t = time.perf_counter(); shm_broadcast.sched_yield(); nap = time.perf_counter() - t
print(patched, nap)
"""


def _run_plugin_check(env_value):
    env = {k: v for k, v in os.environ.items() if k != "STREAMRL_VLLM_SPIN_SLEEP_S"}
    if env_value is not None:
        env["STREAMRL_VLLM_SPIN_SLEEP_S"] = env_value
    out = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    patched, nap = out.stdout.split()[-2:]
    return patched == "True", float(nap)


def test_vllm_plugin_naps_only_when_asked():
    patched, nap = _run_plugin_check("0.05")
    assert patched and nap >= 0.04  # the spin's turn now sleeps the asked 50 ms
    patched, _ = _run_plugin_check(None)
    assert not patched  # other vLLM users in the environment keep vLLM's own spin


def test_gc_clock_counts_full_collections_and_settle_freezes():
    clock = GcClock()
    try:
        before = clock.full
        gc.collect()
        assert clock.full == before + 1 and clock.seconds > 0
        junk = [[i] for i in range(10_000)]
        settle()
        assert gc.get_freeze_count() > len(junk)  # what exists now is out of the collector's view
    finally:
        gc.callbacks.remove(clock._on_gc)
        gc.unfreeze()


def test_heap_trim_runs_at_most_once_a_period():
    trim = HeapTrim(every_s=3600)
    assert not trim.maybe()  # not due: the period starts at construction
    trim.last -= 3600
    assert trim.maybe() == (trim._trim is not None) and not trim.maybe()  # glibc: trimmed once, then not due


def test_loop_watch_names_the_code_that_held_the_loop() -> None:
    """A coroutine that blocks the loop for 1.2 s shows as a lag of about that much, with its stack."""
    import asyncio

    from rl.core.heap import LoopWatch

    def hold_the_loop() -> None:
        time.sleep(1.2)

    async def main() -> dict:
        watch = LoopWatch(stall_s=0.2)
        watch.start()
        await asyncio.sleep(0.1)
        assert watch.take()["lag_max_s"] < 0.5  # an idle loop beats about on time (a busy box adds a little)
        hold_the_loop()
        await asyncio.sleep(0.1)
        out = watch.take()
        watch.stop()
        return out

    out = asyncio.run(main())
    assert out["lag_max_s"] > 1.1
    assert any("hold_the_loop" in st["stack"] and st["lag_s"] > 0.2 for st in out["stalls"])
