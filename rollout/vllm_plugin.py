"""A vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process: the engine core
and each worker. It only acts when a streamrl rollout worker asked for it through the environment, so other
vLLM users in the same environment (a benchmark's TRL, a user's server) are untouched.

`STREAMRL_VLLM_SPIN_SLEEP_S`: readers of vLLM's shared-memory message queues (the engine core waiting for
its worker, the worker waiting for the next step) spin on `sched_yield` for a second after each read before
they sleep on a socket. Two processes spinning take the cores a trainer on the same machine needs (measured
on 2 cores: the engine's two processes spent 60% and 36% of their CPU in `sched_yield`). With this set, each
turn of that spin sleeps this long instead: a few microseconds of CPU per turn, at most this much latency per
message. The rollout worker's default on CPU is 3 ms (the CPU default's step, 200 steps each: 0.29 s at
0.1 ms, 0.24 s at 1 ms, 0.21 s at 3 ms; generation runs ahead of training there, so its extra latency is
hidden; at eta 0 it is not, and a smaller value may suit). (Shortening the spin instead is no good: the socket wake-ups it falls back to can be lost, and a
lost one costs seconds.) The rollout worker sets it on CPU (docs/benchmarks.md, "CPU step").
"""

from __future__ import annotations

import os
import time

ENV = "STREAMRL_VLLM_SPIN_SLEEP_S"


def register() -> None:
    value = os.environ.get(ENV)
    if not value:
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    if not hasattr(shm_broadcast, "sched_yield") or getattr(shm_broadcast, "_streamrl_patched", False):
        return
    pause = float(value)

    def nap() -> None:
        time.sleep(pause)

    shm_broadcast.sched_yield = nap
    shm_broadcast._streamrl_patched = True
