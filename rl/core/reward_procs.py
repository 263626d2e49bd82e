"""Reward calls in processes of their own (`reward.isolation=process`): a hung call is abandoned without
leaving a worker behind.

A thread running a hung synchronous call can never be stopped, so with `reward.isolation=thread` each
timed-out call keeps its thread until the function returns. Here each call runs in one of `size` worker
processes; a call past its timeout gets its process killed and replaced, and counts as abandoned. The
function is loaded in each process from its recipe name (a class is constructed once per process).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any


def _serve(spec: str, cfg: Any, conn: Any) -> None:
    """A worker process: load the reward function, then answer one call at a time."""
    import inspect
    import traceback

    from rl.core.plugins import load_function

    try:
        fn = load_function(spec, "reward.fn")
        if inspect.isclass(fn):
            fn = fn(cfg)
    except BaseException as exc:  # the parent reports it per call
        fn, load_error = None, f"could not be loaded: {type(exc).__name__}: {exc}"
    conn.send("ready")  # a call's timeout counts from here: start-up (imports, a model load) is not the call's
    while True:
        try:
            arg = conn.recv()
        except EOFError:
            return
        if fn is None:
            conn.send((False, load_error))
            continue
        try:
            conn.send((True, fn(arg)))
        except BaseException as exc:  # the user's code: reported, never fatal
            conn.send((False, f"raised {type(exc).__name__}: {exc}" if str(exc) else
                       f"raised {type(exc).__name__}: {traceback.format_exc(limit=1).strip()}"))


START_S = 300.0  # how long a reward process may take to start (import the function, construct a class)


class _Proc:
    def __init__(self, ctx: Any, spec: str, cfg: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(spec, cfg, child), daemon=True, name="streamrl-reward")
        self.proc.start()
        child.close()
        try:
            ready = self.conn.poll(START_S) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError(f"a reward process for {spec} did not start within {START_S:.0f} s "
                               f"(exit code {self.proc.exitcode})")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardProcesses:
    """`size` processes calling `spec`; `call(arg, timeout_s)` returns the function's value or raises
    TimeoutError (the process was killed and replaced) or RuntimeError (the function raised)."""

    def __init__(self, spec: str, cfg: Any, size: int) -> None:
        self.spec, self.cfg = spec, cfg
        self.ctx = mp.get_context("spawn")  # no fork of a process that holds threads (Ray, vLLM)
        self.idle: asyncio.Queue[_Proc] | None = None
        self.size = size

    async def _get(self) -> _Proc:
        if self.idle is None:  # made on the loop that calls
            self.idle = asyncio.Queue()
            procs = await asyncio.to_thread(lambda: [_Proc(self.ctx, self.spec, self.cfg) for _ in range(self.size)])
            for p in procs:
                self.idle.put_nowait(p)
        return await self.idle.get()

    async def call(self, arg: Any, timeout_s: float) -> Any:
        proc = await self._get()
        assert self.idle is not None
        try:
            ok, value = await asyncio.to_thread(self._roundtrip, proc, arg, timeout_s)
        except TimeoutError:
            await asyncio.to_thread(proc.kill)
            proc = await asyncio.to_thread(_Proc, self.ctx, self.spec, self.cfg)
            raise
        except (EOFError, OSError):  # the process died mid-call (os._exit, a crash): replace it
            await asyncio.to_thread(proc.kill)
            code = proc.proc.exitcode
            proc = await asyncio.to_thread(_Proc, self.ctx, self.spec, self.cfg)
            raise RuntimeError(f"its process ended during the call (exit code {code})") from None
        finally:
            self.idle.put_nowait(proc)
        if not ok:
            raise RuntimeError(value)
        return value

    @staticmethod
    def _roundtrip(proc: _Proc, arg: Any, timeout_s: float) -> tuple[bool, Any]:
        proc.conn.send(arg)
        deadline = time.monotonic() + timeout_s
        while not proc.conn.poll(0.05):
            if not proc.proc.is_alive():
                raise EOFError("reward process exited")
            if time.monotonic() > deadline:
                raise TimeoutError
        return proc.conn.recv()

    def close(self) -> None:
        if self.idle is None:
            return
        while not self.idle.empty():
            self.idle.get_nowait().kill()
