"""TrainerGroup: the controller's one handle on all trainer ranks (a thin typed facade over Ray).

Methods that fan a call out to every rank wait for all of them with the run's timeout and name the rank
that failed: a rank that dies (its process or node gone) becomes `TrainerRankDied` (a `PeerDied`: "trainer
rank 1 died while we waited for training step 7 ..."), an exception inside a rank becomes `TrainerRankError` with the rank and
the call. After either the group cannot go on (its collectives have lost a member): shut it down, build a
new TrainerGroup and `resume_latest()` from the newest checkpoint of the run directory.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Optional

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from datastore.client import DataStore
from rl.core.config import Recipe
from rl.core.placement import Placement
from rl.core.transport import ChannelSpec, WeightHandle
from rl.core.waits import PeerDied, WaitTimeout, await_, reserve, wait
from trainer import checkpoint
from trainer.worker import StepResult, TrainerActor

SETTLE_S = 3.0  # after one rank fails, how long the others get to report (a death outranks its echoes)


class TrainerRankError(RuntimeError):
    """A trainer rank raised; the message names the rank and the call."""


class TrainerRankDied(PeerDied):
    """A trainer rank's process died; the message names the rank and the call."""


class TrainerGroup:
    def __init__(self, recipe: Recipe, model_path: str, store: DataStore, partition: str, device: str,
                 run_dir: str | Path | None = None, placement: Optional["Placement"] = None) -> None:
        """`placement`: bundles of a placement group shared with the rollout engines (placements timeshare and
        share: each rank takes half of its bundle's GPU); default: a placement group of its own, a GPU a rank."""
        self.recipe, self.timeout = recipe, recipe.resources.wait_timeout_s
        self.run_dir = Path(run_dir) if run_dir else None
        self.failed = False  # a rank failed: the group cannot run collectives any more
        n = recipe.trainer.world_size
        self.own_pg = placement is None
        if placement is None:
            bundle = {"CPU": 1, **({"GPU": 1} if device == "cuda" else {})}
            pg = reserve([bundle] * n, self.timeout, "the trainer")
            placement = Placement(pg, list(range(n)), 1.0 if device == "cuda" else 0.0)
        self.pg = placement.pg
        self.ranks = [
            TrainerActor.options(
                num_gpus=placement.gpus if device == "cuda" else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=placement.bundles[r]),
            ).remote(r, recipe, model_path, store, partition, device, str(self.run_dir) if self.run_dir else None)
            for r in range(n)
        ]

    # ------------------------------------------------------------------ fan-out with per-rank errors
    def _failure(self, failures: dict[int, BaseException], what: str) -> Exception:
        self.failed = True
        dead = sorted(r for r, e in failures.items() if isinstance(e, RayActorError))
        latest = checkpoint.latest_checkpoint(self.run_dir) if self.run_dir else None
        hint = (f" The trainer group cannot continue; start a new one and resume from {latest}." if latest else
                " The trainer group cannot continue; there is no checkpoint to resume from"
                + (" yet." if self.run_dir else " (no run_dir)."))
        if dead:
            cause = str(failures[dead[0]]).strip().splitlines()[0][:300].rstrip(".")
            also = f" (ranks {dead} are all gone)" if len(dead) > 1 else ""
            return TrainerRankDied(f"trainer rank {dead[0]} died while we waited for {what}{also}: {cause}.{hint}")
        r = min(failures)
        err = TrainerRankError(f"trainer rank {r} failed during {what}: {failures[r]}\n{hint.strip()}")
        err.__cause__ = failures[r]  # what it failed on (a dead storage unit, say) stays findable
        return err

    def _timeout(self, what: str, waited: float, ranks: list[int]) -> WaitTimeout:
        self.failed = True
        return WaitTimeout(f"Timed out after {waited:.1f} s waiting for {what} from trainer ranks {ranks} "
                           "(a rank stuck in a collective usually means another rank failed; see its log)")

    def _all(self, refs: list[ray.ObjectRef], what: str, timeout: Optional[float] = None) -> list[Any]:
        """Every rank's result, or the first failure attributed to its rank."""
        timeout = timeout or self.timeout
        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending, failures = list(refs), {}
        t0 = time.monotonic()
        while pending:
            left = timeout - (time.monotonic() - t0)
            if failures:
                left = min(left, SETTLE_S)
            if left <= 0:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                break
            for ref in ready:
                try:
                    results[rank_of[ref]] = ray.get(ref, timeout=0)
                except Exception as exc:
                    failures[rank_of[ref]] = exc
        if failures:
            raise self._failure(failures, what)
        if pending:
            raise self._timeout(what, time.monotonic() - t0, sorted(rank_of[r] for r in pending))
        return results

    async def _all_async(self, refs: list[ray.ObjectRef], what: str, timeout: Optional[float] = None) -> list[Any]:
        """`_all` for the controller's event loop."""
        timeout = timeout or self.timeout
        tasks = {asyncio.wrap_future(ref.future()): r for r, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending, failures = set(tasks), {}
        t0 = time.monotonic()
        try:
            while pending:
                left = timeout - (time.monotonic() - t0)
                if failures:
                    left = min(left, SETTLE_S)
                if left <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_EXCEPTION)
                if not done:
                    break
                for task in done:
                    if task.exception() is not None:
                        failures[tasks[task]] = task.exception()
                    else:
                        results[tasks[task]] = task.result()
        finally:
            for task in pending:
                task.cancel()
        if failures:
            raise self._failure(failures, what)
        if pending:
            raise self._timeout(what, time.monotonic() - t0, sorted(tasks[t] for t in pending))
        return results

    # ------------------------------------------------------------------ the controller's calls
    def setup(self) -> list[dict[str, Any]]:
        addr, port = wait(self.ranks[0].address.remote(), self.timeout, "its address", "trainer rank 0")
        return self._all([r.setup.remote(addr, port) for r in self.ranks], "process-group setup and model load")

    async def train_step(self, step: int) -> StepResult:
        """One step on every rank; rank 0's result (its metrics are already global)."""
        refs = [r.train_step.remote(step) for r in self.ranks]
        out = await self._all_async(refs, f"training step {step}", self.timeout * 2)
        return out[0]

    def recovered(self) -> None:
        """A call failed for a reason outside the ranks (an engine died in a sync) and a retry ran on every
        rank: the group can run collectives again (shutdown waits for them once more)."""
        self.failed = False

    def ask_yield(self) -> None:
        """Ask the running step to give way if it is still waiting for its batch (TrainerWorker.ask_yield);
        rank 0 decides for every rank. Fire and forget: the step's answer says whether it did."""
        self.ranks[0].ask_yield.remote()

    # ------------------------------------------------------------------ the weight channel
    def open_weight_channel(self, kind: str, num_receivers: int) -> ChannelSpec:
        """Every rank builds its weight sender; returns rank 0's spec for the engine workers to join with.
        Then start the engines' joins and `connect_weight_channel_ref()` together: a group forms only
        when all its members arrive."""
        specs = self._all([r.open_weight_channel.remote(kind, num_receivers) for r in self.ranks],
                          f"opening the {kind} weight channel")
        return specs[0]

    def connect_weight_channel_ref(self) -> ray.ObjectRef:
        """Rank 0's join of the weight channel, as an ObjectRef to wait on beside the engines' joins."""
        return self.ranks[0].connect_weight_channel.remote()

    async def send_weights(self, probe: bool = False) -> WeightHandle:
        """Every rank gathers its shards bucket by bucket; rank 0 sends. On a streaming channel this returns
        only when every engine worker has received, so start the engines' `update_weights` alongside."""
        refs = [r.send_weights.remote(probe) for r in self.ranks]
        out = await self._all_async(refs, "sending the weights" + (" (probe)" if probe else ""))
        return out[0]

    async def release_weights(self, handle: WeightHandle) -> None:
        await await_(self.ranks[0].release_weights.remote(handle), self.timeout, "weight release", "trainer rank 0")

    def sequence_logprobs(self, token_ids: list[int]) -> list[float | None]:
        return self._all([r.sequence_logprobs.remote(token_ids) for r in self.ranks], "sequence logprobs")[0]

    # ------------------------------------------------------------------ checkpoints and export
    @staticmethod
    def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
        """The newest complete checkpoint under `<run_dir>/checkpoints`, or None."""
        return checkpoint.latest_checkpoint(run_dir)

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint now and wait until it is on disk (default path: <run_dir>/checkpoints/step_<version>)."""
        p = None if path is None else str(path)
        out = self._all([r.save_checkpoint.remote(p, True) for r in self.ranks], "a checkpoint save")
        return Path(out[0])

    async def start_checkpoint(self) -> Path:
        """Begin an asynchronous checkpoint of the current version (training goes on while it writes; the
        previous one is finished first)."""
        refs = [r.save_checkpoint.remote(None, False) for r in self.ranks]
        out = await self._all_async(refs, "the start of a checkpoint")
        return Path(out[0])

    def wait_checkpoint(self) -> Optional[Path]:
        """Wait for the asynchronous checkpoint being written, if any (call before reading it or exiting)."""
        out = self._all([r.wait_checkpoint.remote() for r in self.ranks], "the checkpoint write to finish")
        return Path(out[0]) if out[0] else None

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore every rank from a checkpoint saved with any number of ranks; returns its version (the
        step to train next)."""
        out = self._all([r.load_checkpoint.remote(str(path)) for r in self.ranks], f"loading checkpoint {path}")
        return out[0]

    def resume_latest(self) -> Optional[int]:
        """Load the newest checkpoint of the run directory if there is one; returns its version or None."""
        latest = checkpoint.latest_checkpoint(self.run_dir) if self.run_dir else None
        return None if latest is None else self.load_checkpoint(latest)

    def export_hf(self, out_dir: str | Path) -> Path:
        """Write the policy as a Hugging Face directory (config, tokenizer, safetensors in model.dtype)."""
        out = self._all([r.export_hf.remote(str(out_dir)) for r in self.ranks], f"the HF export to {out_dir}")
        return Path(out[0])

    def full_params(self) -> dict[str, Any]:
        """Every full parameter of the policy as a float32 NumPy array (for tests and debugging)."""
        return self._all([r.full_params.remote() for r in self.ranks], "full parameters")[0]

    def shutdown(self) -> None:
        """Finish any checkpoint write and leave the process group, then end the actors. After a rank failed
        the others may sit in a collective, so they are ended without waiting."""
        if not self.failed:
            try:
                self.ask_yield()  # a step still waiting for its batch (a stop mid-run) returns instead of holding the ranks
                wait([r.shutdown.remote() for r in self.ranks], self.timeout, "shutdown (and any checkpoint write)",
                     "trainer ranks")
            except Exception:
                pass
        for r in self.ranks:
            ray.kill(r)
        if self.own_pg:
            ray.util.remove_placement_group(self.pg)
