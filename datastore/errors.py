"""Errors of the data store, and the translation of Ray's wrappers into plain Python errors.

A bad call into an actor comes back from Ray as a `RayTaskError` wrapping the real error; callers get the
real KeyError / TypeError / ValueError instead. A dead actor comes back as `PeerDied` naming which one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from ray.exceptions import RayActorError, RayTaskError

from rl.core.waits import PeerDied, WaitTimeout

RECOVERY_HINT = ("its rows are lost from memory; finished rows are in the log when the store has a log_dir: "
                 "shut the store down and DataStore.create(..., log_dir=<the same dir>) recovers them")


class StoreFull(WaitTimeout):
    """A put waited its whole timeout for room under the store's capacity; the message says what holds it."""


class StoreActorDied(PeerDied):
    """A storage unit or the controller died; the message names which one."""


def plain(exc: BaseException) -> BaseException:
    """The error an actor raised, out of Ray's `RayTaskError` wrapper (recursively)."""
    while isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


@contextlib.contextmanager
def translated(whom: str, hint: str = "") -> Iterator[None]:
    """Re-raise Ray's wrappers as plain errors; a dead actor as StoreActorDied naming `whom`."""
    try:
        yield
    except RayTaskError as exc:
        cause = plain(exc)
        if isinstance(cause, RayActorError):
            raise StoreActorDied(f"{whom} failed because an actor it called died: {cause}") from None
        raise cause from None
    except StoreActorDied:
        raise
    except PeerDied as exc:
        raise StoreActorDied(f"{exc}" + (f"; {hint}" if hint else "")) from None
    except RayActorError as exc:
        raise StoreActorDied(f"{whom} died: {exc}" + (f"; {hint}" if hint else "")) from None
