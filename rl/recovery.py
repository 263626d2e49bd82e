"""Restarts inside a run: after a trainer rank or a storage unit dies, the run goes on from its last checkpoint.

A dead rollout worker or vLLM engine is recovered where it is (rollout.router): the run does not stop. A
dead trainer rank takes the trainer group's state with it (FSDP shards, optimizer), and a dead storage unit
the rows it held in memory; both live on disk (the checkpoint, the store's log), so the run is torn down and
built again from them exactly as `streamrl resume` would (rl.resume: nothing trained twice in the final
lineage, samples of a lost lineage dropped, the staleness rule held), in the same process, up to
`resources.max_restarts` times. Each restart is a line of <run_dir>/restarts.jsonl.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from datastore.errors import StoreActorDied, plain
from rl.controller import Controller
from trainer.checkpoint import latest_checkpoint
from trainer.group import TrainerRankDied

log = logging.getLogger(__name__)

RESTARTS = "restarts.jsonl"


def restart_cause(exc: BaseException) -> Optional[str]:
    """What died, if `exc` (or an error it came from) is the death of a part that a restart from the last
    checkpoint recovers: a trainer rank or a data store actor. None for anything else (a bug, a bad input,
    a timeout: running it again would fail again)."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (StoreActorDied, TrainerRankDied)):
            return str(plain(e)).strip().splitlines()[0][:300]  # raised in an actor: its own message, not Ray's
        e = e.__cause__ or e.__context__
    return None


def run_with_restarts(ctl: Controller) -> Controller:
    """Build and run `ctl`; after a restartable failure, tear it down and go on from the run's last
    checkpoint, up to `resources.max_restarts` times. Returns the controller that finished the run."""
    restarts = 0
    while True:
        try:
            try:
                ctl.build()
                ctl.run()
                return ctl
            finally:
                ctl.shutdown()
        except Exception as exc:
            cause = restart_cause(exc)
            allowed = ctl.recipe.resources.max_restarts
            if cause is None or restarts >= allowed:
                if cause is not None:
                    log.error("not restarting: resources.max_restarts=%d restarts were used", allowed)
                raise
            ckpt = latest_checkpoint(ctl.run_dir)
            if ckpt is None:
                log.error("not restarting: the run has no checkpoint yet (trainer.checkpoint_every=%d)",
                          ctl.recipe.trainer.checkpoint_every)
                raise
            restarts += 1
            log.error("%s\nrestarting the run from its checkpoint %s (restart %d of resources.max_restarts=%d)",
                      cause, ckpt, restarts, allowed)
            _note(ctl.run_dir, {"time": time.time(), "restart": restarts, "cause": cause, "checkpoint": str(ckpt),
                                "failed_at_step": ctl.version})
            ctl = Controller.from_run_dir(ctl.run_dir)


def _note(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / RESTARTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_restarts(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / RESTARTS
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []
