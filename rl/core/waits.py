"""Every blocking wait in streamrl goes through here, so none can hang silently.

`wait(...)` and `await_(...)` take the thing awaited, a timeout, and words for *what* is awaited and
*from whom*; on expiry they raise `WaitTimeout` naming both and the time waited. A dead actor becomes
`PeerDied` naming who died while we waited for what.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError


class WaitTimeout(TimeoutError):
    """A blocking wait expired; the message names what was awaited, from whom, and for how long."""


class PeerDied(RuntimeError):
    """The actor we were waiting on died."""


def died(exc: BaseException) -> bool:
    """Whether `exc` from a wait says the awaited actor's process is gone. An actor that lives and raised
    a PeerDied of its own (say, a storage unit it called died) reaches us as Ray's `RayTaskError`, which is
    also an instance of PeerDied: that is the actor's error, not its death."""
    return isinstance(exc, (PeerDied, RayActorError)) and not isinstance(exc, RayTaskError)


def _timeout_msg(what: str, whom: str, seconds: float, hint: str = "") -> str:
    msg = f"Timed out after {seconds:.1f} s waiting for {what} from {whom}"
    return msg + (f". {hint}" if hint else "")


def wait(refs: Any, timeout: float, what: str, whom: str, hint: str = "") -> Any:
    """`ray.get` with a timeout whose error says what was awaited from whom."""
    t0 = time.monotonic()
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError:
        raise WaitTimeout(_timeout_msg(what, whom, time.monotonic() - t0, hint)) from None
    except RayActorError as exc:
        raise PeerDied(f"{whom} died while we waited for {what}: {exc}") from exc


async def await_(aw: Any, timeout: float, what: str, whom: str, hint: str = "") -> Any:
    """Await an ObjectRef, coroutine or future with a timeout whose error says what and from whom."""
    t0 = time.monotonic()
    try:
        return await asyncio.wait_for(_as_awaitable(aw), timeout)
    except asyncio.TimeoutError:
        raise WaitTimeout(_timeout_msg(what, whom, time.monotonic() - t0, hint)) from None
    except RayActorError as exc:
        raise PeerDied(f"{whom} died while we waited for {what}: {exc}") from exc


def reserve(bundles: list[dict[str, float]], timeout: float, purpose: str, strategy: str = "PACK") -> Any:
    """A ready placement group of `bundles`; on timeout the error names the bundles, what they are for,
    and what the cluster has free (the usual cause: an earlier run's actors or groups still hold it)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    try:
        wait(pg.ready(), timeout, f"a placement group of {len(bundles)} x {bundles[0]} for {purpose}", "the Ray cluster")
    except WaitTimeout as exc:
        remove_placement_group(pg)
        free, total = _plain(ray.available_resources()), _plain(ray.cluster_resources())
        raise WaitTimeout(f"{exc}. The cluster has free {free} of {total}: it cannot hold these bundles now "
                          "(another run's actors or placement groups may hold them)") from None
    return pg


def _plain(resources: dict[str, float]) -> dict[str, float]:
    """CPU, GPU and custom resources, without memory and Ray's per-node / per-group bookkeeping keys."""
    return {k: v for k, v in resources.items()
            if k not in ("memory", "object_store_memory") and "_group_" not in k and not k.startswith("node:")}


def _as_awaitable(aw: Any) -> Any:
    if isinstance(aw, list):
        both = asyncio.gather(*aw)
        # a cancelled wait_for leaves a cancelled gather holding CancelledError as its exception, unread: asyncio
        # would log it with a traceback when a run is stopped (Ctrl-C); read it here
        both.add_done_callback(lambda f: f.cancelled() or f.exception())
        return both
    return aw
