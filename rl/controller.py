"""The single controller: builds the actors, then runs the staleness-bounded asynchronous schedule.

    background (rl.schedule): the feeder starts groups on the rollout router while the staleness budget
      allows; reward workers score samples as they stream into the store; with dynamic sampling a filter
      drops signal-free groups; worker activity spans flow to the timeline
    loop: train a step on B ready groups -> push the new weights to every engine -> log

Rollout never waits for training and training never waits for the slowest rollout; only the staleness
budget (rl.core.staleness) holds the feeder back. Every sample carries the policy version that made it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import ray

from datastore.client import DataStore
from rl.core.config import Recipe, RecipeError, load_recipe, resolve_run_dir, to_yaml
from rl.data import PromptFormatter, PromptStream, synthetic_task
from rl.evaluation import Evaluator
from rl.core.heap import settle
from rl.schedule import Colocation, Feeder, GroupFilter
from rl.stages import Stages
from rl.metrics import MetricsLogger, learning_summary, read_metrics
from rl.models import load_tokenizer, resolve_model_path
from rl.core.placement import Placement, describe, plan
from rl.resume import TRAINED, Resume, refuse_existing_run, require_checkpoint
from rl.core.scoring import WRITE_FIELDS
from rl.reward_worker import RewardActor
from rl.core.staleness import StalenessBudget
from rl.core.waits import WaitTimeout, await_, wait
from rl.watchdog import Watchdog
from rl.weight_sync import WeightSync
from rollout.router import RolloutRouter
from rollout.worker import SAMPLE_FIELDS, RolloutActor
from trainer import checkpoint
from trainer.group import TrainerGroup
from trainer.worker import StepResult

log = logging.getLogger(__name__)

PARTITION = "train"
RECORDS_KEPT = 200  # step records a run keeps in memory for its caller (metrics.jsonl has every step)
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1"}


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init_ray(r: Recipe) -> None:
    """Join the cluster named in the recipe or RAY_ADDRESS (set inside a Ray job); otherwise start a fresh
    local instance (never silently join some other cluster started on this machine) that listens on
    `resources.ray_host` only. A SIGTERM handler set before (the CLI's clean stop) survives Ray's own."""
    on_sigterm = signal.getsignal(signal.SIGTERM)
    address = r.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=True)
    else:
        needed = 2 * (r.rollout.num_engines + r.trainer.world_size) + 1
        ray.init(address="local", num_cpus=r.resources.num_cpus or max(needed, os.cpu_count() or 1),
                 include_dashboard=False, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=True,
                 **ray_listen_args(r.resources.ray_host))
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)  # Ray's handler would sys.exit mid-call


def ray_listen_args(host: str) -> dict[str, Any]:
    """ray.init arguments that make a Ray started here listen on `host` (`resources.ray_host`).

    Ray takes a loopback node address as "use this machine's IP" (services.resolve_ip_for_localhost) unless
    it runs clusterless (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by the processes it starts and, at import,
    by this one); then the GCS, raylet, workers and agents all bind 127.0.0.1. Another address is Ray's
    node address; 0.0.0.0 leaves Ray's defaults (every interface)."""
    if host in ("127.0.0.1", "localhost"):
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; no public switch in Ray 2.60
        return {"_node_ip_address": "127.0.0.1", "dashboard_host": "127.0.0.1"}
    if host == "0.0.0.0":
        return {"dashboard_host": host}
    return {"_node_ip_address": host, "dashboard_host": host}


def spawn_rollout_workers(r: Recipe, model_path: str, store: DataStore, device: str,
                          where: Placement) -> list[ray.actor.ActorHandle]:
    """One RolloutWorker per engine on its placement bundle."""
    return [spawn_rollout_worker(r, i, model_path, store, device, where) for i in range(len(where.bundles))]


def spawn_rollout_worker(r: Recipe, i: int, model_path: str, store: DataStore, device: str,
                         where: Placement) -> ray.actor.ActorHandle:
    """The RolloutWorker of engine i, on its placement bundle (also the replacement of a dead one)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return RolloutActor.options(num_gpus=where.gpus,
                                scheduling_strategy=PlacementGroupSchedulingStrategy(where.pg, where.bundles[i])) \
        .remote(i, model_path, r.rollout, store, PARTITION, r.model.dtype, device, r.seed, r.resources.wait_timeout_s,
                sleep_mode=r.resources.placement == "timeshare", visible_devices=where.devices_of(i), reward=r.reward)


class Controller:
    """Builds the run's actors and runs its schedule; `resume=True` continues the run in `run_dir` from its
    last checkpoint and the data store's log."""

    def __init__(self, recipe: Recipe, run_dir: Path | None = None, resume: bool = False) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir else resolve_run_dir(recipe)
        self.resume = resume
        self.device = pick_device(recipe.resources.device)
        self.timeout = recipe.resources.wait_timeout_s
        self.version = self.start_step = 0
        self.budget = StalenessBudget(recipe.trainer.batch_groups, recipe.algorithm.eta)

    @classmethod
    def from_run_dir(cls, run_dir: Path, overrides: list[str] | None = None) -> "Controller":
        """A controller that resumes the run in `run_dir` with its saved recipe (plus `overrides`)."""
        cfg = Path(run_dir) / "config.yaml"
        if not cfg.exists():
            raise RecipeError(f"{run_dir} is not a run directory (no config.yaml)")
        return cls(load_recipe(cfg, overrides), run_dir, resume=True)

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        r = self.recipe
        if self.resume:  # both checks fail before anything starts
            ckpt: Path | None = require_checkpoint(self.run_dir, r.trainer.checkpoint_every)
            checkpoint.verify(ckpt)  # nothing in a run directory runs on load (UnsafeCheckpoint names the file)
        else:
            refuse_existing_run(self.run_dir)
            ckpt = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            (self.run_dir / "config.yaml").write_text(to_yaml(r))
        self.task = synthetic_task(r.data)
        self.model_path = resolve_model_path(r.model, self.task)
        self.tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptStream(r.data, r.seed)
        self.format_prompt = PromptFormatter(r.data, self.tokenizer)
        if not ray.is_initialized():
            init_ray(r)
        self.start_step = _checkpoint_step(ckpt)
        self.resumed = Resume(self.run_dir, PARTITION, self.start_step, r.rollout.group_size,
                              r.trainer.batch_groups) if self.resume else None
        if self.resumed is not None:
            self.resumed.rewind_records()
        consumers = set(r.datastore.required_consumers) | {"reward", "trainer"} | ({"filter"} if r.algorithm.dynamic_sampling else set())
        if r.reward.inline:  # nobody takes rows as "reward": waiting for it would keep every row in memory
            consumers.discard("reward")
        r.datastore.required_consumers = sorted(consumers)
        self.store = DataStore.from_config(r.datastore, tag_fields=["version"], timeout_s=self.timeout,
                                           declared_fields=SAMPLE_FIELDS + WRITE_FIELDS + ["accepted"] * r.algorithm.dynamic_sampling,
                                           run_dir=self.run_dir)
        engines_at, trainer_at, found = plan(r, self.device, self.model_path)
        log.info("placement: %s", describe(found))
        self.engine_pg, self.engines_at = engines_at.pg, engines_at
        self.rollouts = spawn_rollout_workers(r, self.model_path, self.store, self.device, engines_at)
        self.rewarders = [] if r.reward.inline else \
            [RewardActor.remote(i, r.reward, self.store, PARTITION) for i in range(r.reward.num_workers)]
        self.trainer = TrainerGroup(r, self.model_path, self.store, PARTITION, self.device, run_dir=self.run_dir,
                                    placement=trainer_at)
        engines = [w.start.remote() for w in self.rollouts]
        apart = r.resources.placement == "separate"  # on a shared GPU vLLM must measure free memory before the trainer loads
        if apart:  # the engines start while the trainer loads
            log.info("trainer ranks ready: %s", self.trainer.setup())
        started = wait(engines, self.timeout, "vLLM engine start", f"rollout workers 0..{len(self.rollouts) - 1}")
        log.info("rollout engines started: %s", started)
        if not apart:
            log.info("trainer ranks ready: %s", self.trainer.setup())
        if ckpt is not None:
            self.version = self.trainer.load_checkpoint(ckpt)
            log.info("resumed from %s at version %d", ckpt, self.version)
        self.weights = WeightSync(self.trainer, self.rollouts, r.rollout.weight_transport,
                                  r.rollout.tensor_parallel_size, self.device,
                                  colocated=r.resources.placement != "separate", timeout_s=self.timeout)
        self.weights.open()
        if ckpt is not None:  # the engines loaded the base model: what they generate must be the checkpoint's
            asyncio.run(self.weights.push())
        self.router = RolloutRouter(self.rollouts, r.rollout.max_tokens, self.timeout, respawn=self._respawn,
                                    max_respawns=r.resources.max_restarts)
        self.weights.router = self.router
        self.watchdog = Watchdog(self.trainer.ranks, self.rollouts, r.resources.stall_warn_s)
        settle()

    async def run_async(self) -> list[dict[str, Any]]:
        """The loop: train a step on ready groups, push the weights, log. Everything else runs beside it.
        Returns the records of the last `RECORDS_KEPT` steps: a long run's memory stays flat, and
        metrics.jsonl (`rl.metrics.read_metrics`) has every step."""
        r = self.recipe
        metrics = MetricsLogger(self.run_dir, r.logging, r.trainer.total_steps, start_step=self.start_step)
        stages = self._stages(metrics)
        records: deque[dict[str, Any]] = deque(maxlen=RECORDS_KEPT)
        error: BaseException | None = None
        deferred: tuple[int, dict[str, Any], asyncio.Future] | None = None
        try:
            await stages.start()
            for step in range(self.start_step, r.trainer.total_steps):
                if self.colocation.enabled:  # timeshare: the step's groups finish, then the engines sleep
                    with metrics.phase("wait_rollout"):
                        await self.colocation.wait_rollout(self.version)
                    with metrics.phase("sleep"):
                        await self.colocation.sleep()
                with metrics.phase("train", actor="trainer"):
                    train = asyncio.ensure_future(self.trainer.train_step(step))
                    if deferred is not None:  # the last step's record, written while this step trains
                        records.append(await self._record(metrics, deferred, stages))
                        deferred = None
                    result = await self._train(step, train, stages)
                self._record_trained(step, result)
                m = result.metrics
                with metrics.phase("sync", actor="trainer"):
                    m.update(await self._watched(self.weights.push(), f"the weight sync after step {step}", stages))
                if self.colocation.enabled:
                    with metrics.phase("wake"):
                        await self.colocation.after_sync()
                self.version = step + 1
                stages.on_version(self.version)
                # the step ends here; its stage metrics (a round of actor calls) are gathered beside the next step
                m.update(metrics.take_phases(), time=time.time())
                deferred = (step, m, asyncio.ensure_future(stages.step_metrics(m)))
                if self._checkpoint_due(step + 1):  # a checkpoint never holds a step its records lack
                    records.append(await self._record(metrics, deferred, stages))
                    deferred = None
                    await self.trainer.start_checkpoint()
            if deferred is not None:
                records.append(await self._record(metrics, deferred, stages))
                deferred = None
            await self._finish()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if deferred is not None:
                deferred[2].cancel()
            await stages.stop()
            metrics.close(error)
        (self.run_dir / "summary.json").write_text(json.dumps(learning_summary(read_metrics(self.run_dir)), indent=2))
        return list(records)

    async def _train(self, step: int, train: asyncio.Future, stages: "Stages") -> StepResult:
        """The step's result. While it waits for its batch and an engine that came back (restarted or
        replaced) waits for the current weights, the step gives way (TrainerWorker.ask_yield), the weights
        are pushed, and the step is asked again: with no other engine its batch could come only from that one."""
        nudge = None if self.colocation.enabled else self._give_way_if_needed
        result = await self._watched(train, f"training step {step}", stages, nudge)
        while result.yielded:
            self._record_trained(step, result)  # the rows it dropped as too stale before it gave way
            log.warning("step %d gave way to a weight sync for the engines that came back", step)
            await self._watched(self.weights.push(), f"the weight sync for engines that came back, before step {step}",
                                stages)
            result = await self._watched(self.trainer.train_step(step), f"training step {step}", stages, nudge)
        return result

    def _give_way_if_needed(self) -> None:
        """Each second of a step: an engine that came back waits for the weights, so ask the step to give way."""
        if self.router.waiting_for_weights():
            self.trainer.ask_yield()

    async def _respawn(self, i: int) -> ray.actor.ActorHandle:
        """A new rollout worker in place of engine i's dead one, started (the router gives it work once a
        weight sync has reached it)."""
        try:
            ray.kill(self.rollouts[i], no_restart=True)
        except Exception:
            pass
        w = spawn_rollout_worker(self.recipe, i, self.model_path, self.store, self.device, self.engines_at)
        info = await await_(w.start.remote(), self.timeout, "vLLM engine start", f"the new rollout worker {i}")
        log.warning("rollout worker %d: a new engine started (%s)", i, info)
        return w

    def _stages(self, metrics: MetricsLogger) -> "Stages":
        r = self.recipe
        evaluator = Evaluator.from_recipe(r, self.prompts, self.format_prompt, self.tokenizer, self.router,
                                          self.run_dir, lambda: self.version)  # first: it holds prompts out of training
        self.feeder = Feeder(r, self.budget, self.prompts, self.format_prompt, self.tokenizer, self.router,
                             lambda: self.version)
        requeue = [] if self.resumed is None else self.resumed.restore_rollout(
            (self.store.recovered or {}).get(PARTITION, {}), self.store.held(PARTITION, "trainer"), self.feeder,
            self.budget)
        self.colocation = Colocation(r.resources.placement == "timeshare", self.rollouts, self.budget,
                                     r.rollout.sleep_level, self.timeout,
                                     busy=evaluator.busy if evaluator is not None else lambda: False)
        gfilter = None
        if r.algorithm.dynamic_sampling:
            gfilter = GroupFilter(self.store, PARTITION, r.rollout.group_size, self.budget, self.feeder.wake.set,
                                  r.algorithm.dynamic_sampling_max_drops or 20 * r.trainer.batch_groups)
        return Stages(self.feeder, gfilter, self.budget, self.router, self.store, self.rollouts, self.rewarders,
                      metrics, self.timeout, requeue, evaluator, reward_fn=r.reward.fn)

    def _record_trained(self, step: int, result: StepResult) -> None:
        """Which rows the step trained on and dropped (as too stale): the resume record, one line a step."""
        trained, dropped = result.trained, result.dropped
        if not trained and not dropped:
            return
        self.budget.on_drop(len(dropped) // self.recipe.rollout.group_size)
        with open(self.run_dir / TRAINED, "a") as f:
            f.write(json.dumps({"step": step, "trained": trained, "dropped": dropped}) + "\n")

    async def _record(self, metrics: MetricsLogger, deferred: tuple[int, dict[str, Any], asyncio.Future],
                      stages: "Stages") -> dict[str, Any]:
        """A step's record, once its stage metrics (gathered beside the next step) are in."""
        step, m, extra = deferred
        m.update(await self._watched(extra, f"step {step}'s stage metrics", stages))
        return metrics.log(step, m)

    def _checkpoint_due(self, version: int) -> bool:
        """Every `trainer.checkpoint_every` versions (after the step's records are written: a resume from
        this checkpoint then finds every step it holds in metrics.jsonl and trained.jsonl)."""
        every = self.recipe.trainer.checkpoint_every
        return bool(every) and version % every == 0

    async def _finish(self) -> None:
        """The final checkpoint (when checkpointing) and the final model as a Hugging Face directory."""
        r = self.recipe
        if r.trainer.checkpoint_every:
            await asyncio.to_thread(self.trainer.wait_checkpoint)
            if self.version % r.trainer.checkpoint_every:
                await asyncio.to_thread(self.trainer.save_checkpoint)
        if r.trainer.export_final:
            out = await asyncio.to_thread(self.trainer.export_hf, self.run_dir / "final_model")
            log.info("final model: %s", out)

    async def _watched(self, aw: Any, what: str, stages: "Stages", nudge: Callable[[], None] | None = None) -> Any:
        """Await `aw` (the loop's waits: a train step, a sync, a step's metrics) unless a background stage
        fails first: then that stage's error is the one raised. A wait that makes no progress for
        `resources.stall_warn_s` gets the watchdog's diagnosis (which actor is stuck, where), logged and
        joined to the timeout's error. `nudge` is called every second of the wait."""
        fut = asyncio.ensure_future(aw)
        started = warned = time.monotonic()
        while True:
            done, _ = await asyncio.wait({fut}, timeout=1.0)
            if done:
                try:
                    return fut.result()
                except Exception as exc:  # a timeout, bare or wrapped (a sync names its side first)
                    timed_out = isinstance(exc, WaitTimeout) or isinstance(exc.__cause__, WaitTimeout)
                    if timed_out and self.watchdog.last:
                        raise WaitTimeout(f"{exc}\nThe watchdog's last look: {self.watchdog.last}") from exc
                    raise
            if nudge is not None:
                nudge()
            failed = stages.error()
            if failed is not None:
                fut.cancel()
                raise RuntimeError(f"{failed[0]} failed while {what} waited: {failed[1]}") from failed[1]
            warned = await self.watchdog.watch(what, started, warned)

    def run(self) -> list[dict[str, Any]]:
        return asyncio.run(self.run_async())

    def shutdown(self) -> None:
        for w in getattr(self, "rollouts", []):
            try:
                wait(w.shutdown.remote(), 60, "engine shutdown", "a rollout worker")
            except Exception:
                pass
        if hasattr(self, "trainer"):
            self.trainer.shutdown()
        if hasattr(self, "engine_pg"):
            for w in getattr(self, "rollouts", []):
                ray.kill(w)
            ray.util.remove_placement_group(self.engine_pg)
        if hasattr(self, "store"):
            self.store.shutdown()


def _checkpoint_step(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    digits = "".join(ch for ch in ckpt.name if ch.isdigit())
    return int(digits) if digits else 0
