"""The weight-sync stage: after each train step, the trainer's weights reach every live engine.

The protocol (docs/weights.md): the trainer's rank 0 opens a channel that every worker of the listed engines
joins once; each sync then runs the trainer's send and every engine's receive at once on a streaming channel
(gloo, nccl, ipc: one broadcast group, the version travels in band), or lets the engines read the file once
the trainer has written it (shm). An engine restarted since the channel formed makes it form again first.
A rollout worker that dies during a sync is handed to the router (which replaces it) and the sync goes on
with the others: the channel forms again without it and the push is made once more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from rl.core.transport import ChannelSpec, WeightHandle, pick_transport
from rl.core.waits import WaitTimeout, await_, died, wait
from rollout.records import UpdateReport

log = logging.getLogger(__name__)


class WeightSync:
    """Pushes the trainer group's weights to the rollout workers; `router` (set once it exists) says which
    engines are live and learns which are current."""

    def __init__(self, trainer: Any, rollouts: list[ray.actor.ActorHandle], transport: str, tp: int, device: str,
                 colocated: bool, timeout_s: float) -> None:
        self.trainer, self.rollouts, self.tp, self.timeout = trainer, rollouts, tp, timeout_s
        self.kind = pick_transport(transport, device, colocated=colocated)
        self.router: Any = None
        self.channel: ChannelSpec | None = None
        self.engines: list[int] = []

    def open(self, engines: list[int] | None = None) -> None:
        """After the engines and the trainer start (and again when the set of live engines changes): the
        trainer's rank 0 opens the weight channel and every worker of the listed engines joins it, all at
        once (a process group forms only when all its members arrive)."""
        engines = list(range(len(self.rollouts))) if engines is None else engines
        kind, tp = self.kind, self.tp
        spec = self.trainer.open_weight_channel(kind, len(engines) * tp)
        whom = {self.trainer.connect_weight_channel_ref(): "trainer rank 0"}
        whom.update({self.rollouts[i].init_weight_channel.remote(spec, 1 + k * tp): f"rollout worker {i}"
                     for k, i in enumerate(engines)})
        pending, deadline = list(whom), time.monotonic() + self.timeout + 60
        while pending:  # the first failure, whoever's, ends the wait
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise WaitTimeout(f"Timed out after {self.timeout + 60:.0f} s waiting for the {kind} weight channel "
                                  f"to form: no answer from {', '.join(whom[r] for r in pending)}")
            wait(done[0], 10, f"joining the {kind} weight channel", whom[done[0]])
        self.channel, self.engines = spec, engines
        log.info("weight channel: %s, trainer rank 0 + %d engine workers", kind, len(engines) * tp)

    def _live(self) -> list[int]:
        return [i for i in range(len(self.rollouts)) if self.router is None or self.router.healthy[i]]

    async def push(self, probe: bool = False) -> dict[str, float]:
        """Push the trainer's weights to every live engine and return the sync's metrics. `probe` moves as
        many bytes and loads nothing (the benchmark's link baseline). An engine whose worker died during
        the sync is left to the router; the others get the weights."""
        try:
            return await self._push(probe)
        except RuntimeError as exc:
            lost = await self._lost() if self.router is not None else set()
            if not lost:
                raise
            log.error("weight sync: rollout engines %s went down during it (%s); the others get the weights again",
                      sorted(lost), exc)
            self.channel = None  # its group had the lost members: it forms again without them
            m = await self._push(probe)
            self.trainer.recovered()  # the send failed on the engines' side; the retry ran on every trainer rank
            m["sync/engines_lost"] = float(len(lost))
            return m

    async def _lost(self) -> set[int]:
        """Engines of the channel (or live) that are down now, each handed to the router: a dead rollout
        worker to be replaced, a dead engine to be restarted in its worker."""
        engines = sorted(set(self.engines) | set(self._live()))
        answers = await asyncio.gather(*[await_(self.rollouts[i].health.remote(), 30, "its health",
                                                f"rollout worker {i}") for i in engines], return_exceptions=True)
        lost = set()
        for i, a in zip(engines, answers):
            if died(a):
                self.router.worker_died(i, str(a))
            elif isinstance(a, tuple) and not a[0]:
                self.router.engine_failed(i, a[1])
            elif not (self.router.healthy[i] and not self.router.needs_weights[i]):
                pass  # already down or back and waiting for these weights: left to the router
            else:
                continue
            lost.add(i)
        return lost

    async def _push(self, probe: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        engines, router = self._live(), self.router
        if not engines:  # every engine is down or restarting: the first sync after a restart brings it up to date
            log.warning("weight sync skipped: no live rollout engine")
            return {"sync/total_s": 0.0, "sync/bytes": 0.0}
        if (self.channel is None or engines != self.engines
                or (router is not None and any(router.needs_weights[i] for i in engines))):
            await asyncio.to_thread(self.open, engines)
        t_open = time.perf_counter() - t0
        spec = self.channel
        assert spec is not None
        what = f"weight {'probe' if probe else 'update'} over {spec.kind}"
        sent = asyncio.ensure_future(self.trainer.send_weights(probe))
        loads: asyncio.Future | None = None
        try:
            handle = WeightHandle(kind=spec.kind, probe=probe) if spec.streams else await sent
            handle.meta["asked_at"] = time.time()  # the engines report how long the call took to reach them
            loads = asyncio.ensure_future(await_([self.rollouts[i].update_weights.remote(handle) for i in engines],
                                                 self.timeout, what, f"rollout workers {engines}"))
            handle, res = await asyncio.gather(sent, loads)
        except BaseException as exc:
            for f in (sent, loads):
                if f is not None:
                    f.cancel()
            if isinstance(exc, Exception):
                raise RuntimeError(f"{what} between the trainer and rollout workers {engines} failed: {exc}") from exc
            raise
        reports: list[UpdateReport] = res
        wrong = {x.rank: x.version for x in reports if x.version != handle.version}
        if wrong:
            raise RuntimeError(f"{what}: the trainer sent version {handle.version}, engines loaded {wrong}")
        await self.trainer.release_weights(handle)
        if router is not None and not probe:
            router.weights_synced(engines)
        return {"sync/total_s": time.perf_counter() - t0, "sync/open_s": t_open,
                "sync/gather_s": handle.meta.get("gather_s", 0.0), "sync/send_s": handle.meta.get("send_s", 0.0),
                "sync/transfer_s": handle.meta.get("transfer_s", 0.0),
                "sync/recv_s": max(x.recv_seconds for x in reports), "sync/load_s": max(x.apply_seconds for x in reports),
                "sync/pause_s": max(x.pause_seconds for x in reports), "sync/engine_s": max(x.seconds for x in reports),
                "sync/dispatch_s": max(x.dispatch_seconds for x in reports),
                "sync/wait_receivers_s": handle.meta.get("wait_receivers_s", 0.0),
                "sync/cut_requests": float(sum(x.cut_requests for x in reports)), "sync/bytes": float(handle.nbytes)}
