"""The single controller: builds the actors, then runs the staleness-bounded asynchronous schedule.

    background (rl.schedule): the feeder starts groups on the rollout router while the staleness budget
      allows; reward workers score samples as they stream into the store; with dynamic sampling a filter
      drops signal-free groups; worker activity spans flow to the timeline
    loop: train a step on B ready groups -> push the new weights to every engine -> log

Rollout never waits for training and training never waits for the slowest rollout; only the staleness
budget (rl.staleness) holds the feeder back. Every sample carries the policy version that made it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import ray

from datastore.client import DataStore
from rl.config import Recipe, RecipeError, load_recipe, resolve_run_dir, to_yaml
from rl.data import PromptFormatter, PromptStream, synthetic_task
from rl.heap import settle
from rl.schedule import Colocation, Feeder, GroupFilter, SpanCollector
from rl.metrics import MetricsLogger, learning_summary, read_metrics
from rl.models import load_tokenizer, resolve_model_path
from rl.placement import Placement, describe, plan
from rl.resume import consumed_rows, lost_lineage, refuse_existing_run, require_checkpoint
from rl.reward_worker import WRITE_FIELDS, RewardActor, death_cause
from rl.staleness import StalenessBudget
from rl.transport import WeightHandle, pick_transport
from rl.waits import WaitTimeout, await_, wait
from rollout.router import RolloutRouter
from rollout.worker import SAMPLE_FIELDS, RolloutActor
from trainer import checkpoint
from trainer.group import TrainerGroup
from trainer.worker import StepResult

log = logging.getLogger(__name__)

PARTITION = "train"
TRAINED = "trained.jsonl"  # per step: the rows it trained on and dropped as too stale (a resume: as a lost lineage)
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
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return [RolloutActor.options(num_gpus=where.gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(where.pg, b))
            .remote(i, model_path, r.rollout, store, PARTITION, r.model.dtype, device, r.seed,
                    r.resources.wait_timeout_s, sleep_mode=r.resources.placement == "timeshare",
                    visible_devices=where.devices_of(i), reward=r.reward) for i, b in enumerate(where.bundles)]


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
        if self.resume:
            self._rewind_records(self.start_step)
        consumers = set(r.datastore.required_consumers) | {"reward", "trainer"} | ({"filter"} if r.algorithm.dynamic_sampling else set())
        if r.reward.inline:  # nobody takes rows as "reward": waiting for it would keep every row in memory
            consumers.discard("reward")
        r.datastore.required_consumers = sorted(consumers)
        self.store = DataStore.from_config(r.datastore, tag_fields=["version"], timeout_s=self.timeout,
                                           declared_fields=SAMPLE_FIELDS + WRITE_FIELDS + ["accepted"] * r.algorithm.dynamic_sampling,
                                           run_dir=self.run_dir)
        engines_at, trainer_at, found = plan(r, self.device, self.model_path)
        log.info("placement: %s", describe(found))
        self.engine_pg = engines_at.pg
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
        self._open_weight_channel()
        if ckpt is not None:  # the engines loaded the base model: what they generate must be the checkpoint's
            asyncio.run(self._sync_weights())
        self.router = RolloutRouter(self.rollouts, r.rollout.max_tokens, self.timeout)
        settle()

    def _rewind_records(self, step: int) -> None:
        """Resuming at `step`: forget what steps >= step did (their training was lost with the process), so
        they run again once: metrics and trained-row records are cut there, and the trainer's consumption
        in the store's log is set back to the rows those earlier steps trained on or dropped, plus the
        groups that versions after `step` helped make (a lost lineage, rl/resume.py), recorded at `step`."""
        from datastore import log as dlog

        kept = [rec for rec in _read_jsonl(self.run_dir / TRAINED) if rec["step"] < step]
        done = {i for rec in kept for i in consumed_rows(rec)}
        log_dir = self.run_dir / "datastore"
        lost = lost_lineage(log_dir, PARTITION, step, self.recipe.rollout.group_size, done) if log_dir.exists() else []
        if lost:
            kept.append({"step": step, "trained": [], "dropped": [], "lost_lineage": lost})
            log.info("resume at step %d: dropped %d logged samples that versions after %d helped make (a lineage "
                     "lost with the crash); new groups take their place", step, len(lost), step)
        _write_jsonl(self.run_dir / TRAINED, kept)
        _write_jsonl(self.run_dir / "metrics.jsonl", [m for m in read_metrics(self.run_dir) if m["step"] < step])
        if log_dir.exists():
            consumed = dlog.read_consumed(str(log_dir))
            part = consumed.setdefault(PARTITION, {})
            part["trainer"] = done | set(lost)
            dlog.rewrite_consumed(str(log_dir), {p: {c: sorted(v) for c, v in cs.items()} for p, cs in consumed.items()})

    def _restore_rollout_state(self) -> None:
        """After a resume: the feeder continues after the last group in the log (group g uses prompt row g),
        groups that lost samples in the crash get just those samples again, and the budget counts what
        is already there (groups of a lost lineage are not: new groups take their slots)."""
        n = self.recipe.rollout.group_size
        rec = self.store.recovered.get(PARTITION, {}) if self.store.recovered else {}
        next_group = -(-rec.get("next_index", 0) // n)
        trained = {i for r in _read_jsonl(self.run_dir / TRAINED) for i in consumed_rows(r)}
        held = self.store.held(PARTITION, "trainer")
        groups: dict[int, list[int]] = {}
        for i in held:
            groups.setdefault(i // n, []).append(i)
        # missing samples by their number j in the group (GroupRequest.samples), not by row index g * n + j
        partial = {g: sorted(set(range(n)) - {i % n for i in rows}) for g, rows in groups.items() if len(rows) < n}
        lost = [g for g in range(next_group) if g not in groups and not any(g * n + j in trained for j in range(n))]
        self.requeue = [(g, missing) for g, missing in partial.items()] + [(g, list(range(n))) for g in lost]
        self.feeder.resume_at(next_group)
        # whole groups held; the requeued ones are counted as Stages.start submits them
        self.budget.restore(self.start_step * self.recipe.trainer.batch_groups + len(groups) - len(partial))
        log.info("resume: %d groups held, %d partial and %d lost groups to complete, next group %d",
                 len(groups), len(partial), len(lost), next_group)

    def _open_weight_channel(self, engines: list[int] | None = None) -> None:
        """After the engines and the trainer start (and again when the set of live engines changes): the
        trainer's rank 0 opens the weight channel and every worker of the listed engines joins it, all at
        once (a process group forms only when all its members arrive)."""
        r = self.recipe
        engines = list(range(len(self.rollouts))) if engines is None else engines
        tp = r.rollout.tensor_parallel_size
        kind = pick_transport(r.rollout.weight_transport, self.device, colocated=r.resources.placement != "separate")
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
        self.weight_channel, self.weight_engines = spec, engines
        log.info("weight channel: %s, trainer rank 0 + %d engine workers", kind, len(engines) * tp)

    async def _sync_weights(self, probe: bool = False) -> dict[str, float]:
        """Push the trainer's weights to every live engine (docs/weights.md). On a streaming channel (gloo,
        nccl, ipc: one broadcast group) the trainer's send and every engine's receive run at once and the
        version travels in band; on shm the engines read the file once the trainer has written it. An engine
        restarted since the channel formed makes it form again first. `probe` moves as many bytes and loads
        nothing (the benchmark's link baseline)."""
        t0 = time.perf_counter()
        router = getattr(self, "router", None)
        engines = [i for i in range(len(self.rollouts)) if router is None or router.healthy[i]]
        if not engines:  # every engine is down or restarting: the first sync after a restart brings it up to date
            log.warning("weight sync skipped: no live rollout engine")
            return {"sync/total_s": 0.0, "sync/bytes": 0.0}
        if (getattr(self, "weight_channel", None) is None or engines != self.weight_engines
                or (router is not None and any(router.needs_weights[i] for i in engines))):
            await asyncio.to_thread(self._open_weight_channel, engines)
        t_open = time.perf_counter() - t0
        spec = self.weight_channel
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
        wrong = {x["rank"]: x["version"] for x in res if x["version"] != handle.version}
        if wrong:
            raise RuntimeError(f"{what}: the trainer sent version {handle.version}, engines loaded {wrong}")
        await self.trainer.release_weights(handle)
        if router is not None and not probe:
            router.weights_synced(engines)
        return {"sync/total_s": time.perf_counter() - t0, "sync/open_s": t_open,
                "sync/gather_s": handle.meta.get("gather_s", 0.0), "sync/send_s": handle.meta.get("send_s", 0.0),
                "sync/transfer_s": handle.meta.get("transfer_s", 0.0),
                "sync/recv_s": max(x["recv_seconds"] for x in res), "sync/load_s": max(x["apply_seconds"] for x in res),
                "sync/pause_s": max(x["pause_seconds"] for x in res), "sync/engine_s": max(x["seconds"] for x in res),
                "sync/dispatch_s": max(x["dispatch_seconds"] for x in res),
                "sync/wait_receivers_s": handle.meta.get("wait_receivers_s", 0.0),
                "sync/cut_requests": float(sum(x["cut_requests"] for x in res)), "sync/bytes": float(handle.nbytes)}

    async def run_async(self) -> list[dict[str, Any]]:
        """The loop: train a step on ready groups, push the weights, log. Everything else runs beside it."""
        r = self.recipe
        metrics = MetricsLogger(self.run_dir, r.logging, r.trainer.total_steps, start_step=self.start_step)
        stages = self._stages(metrics)
        records: list[dict[str, Any]] = []
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
                        records.append(await self._log_step(metrics, *deferred))
                        deferred = None
                    result = await self._train_or_fail(step, stages, train)
                self._record_trained(step, result)
                m = result.metrics
                with metrics.phase("sync", actor="trainer"):
                    m.update(await self._sync_weights())
                if self.colocation.enabled:
                    with metrics.phase("wake"):
                        await self.colocation.after_sync()
                self.version = step + 1
                self.feeder.wake.set()
                # the step ends here; its stage metrics (a round of actor calls) are gathered beside the next step
                m.update(metrics.take_phases(), time=time.time())
                deferred = (step, m, asyncio.ensure_future(stages.step_metrics(m)))
                if self._checkpoint_due(step + 1):  # a checkpoint never holds a step its records lack
                    records.append(await self._log_step(metrics, *deferred))
                    deferred = None
                    await self.trainer.start_checkpoint()
            if deferred is not None:
                records.append(await self._log_step(metrics, *deferred))
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
        return records

    def _stages(self, metrics: MetricsLogger) -> "Stages":
        r = self.recipe
        self.feeder = Feeder(r, self.budget, self.prompts, self.format_prompt, self.tokenizer, self.router,
                             lambda: self.version)
        self.requeue: list[tuple[int, list[int]]] = []
        if self.resume:
            self._restore_rollout_state()
        self.colocation = Colocation(r.resources.placement == "timeshare", self.rollouts, self.budget, r.rollout.sleep_level, self.timeout)
        gfilter = None
        if r.algorithm.dynamic_sampling:
            gfilter = GroupFilter(self.store, PARTITION, r.rollout.group_size, self.budget, self.feeder.wake.set,
                                  r.algorithm.dynamic_sampling_max_drops or 20 * r.trainer.batch_groups)
        return Stages(self, metrics, gfilter)

    def _record_trained(self, step: int, result: StepResult) -> None:
        """Which rows the step trained on and dropped (as too stale): the resume record, one line a step."""
        trained, dropped = result.trained, result.dropped
        self.budget.on_drop(len(dropped) // self.recipe.rollout.group_size)
        with open(self.run_dir / TRAINED, "a") as f:
            f.write(json.dumps({"step": step, "trained": trained, "dropped": dropped}) + "\n")

    @staticmethod
    async def _log_step(metrics: MetricsLogger, step: int, m: dict[str, Any], extra: asyncio.Future) -> dict[str, Any]:
        m.update(await extra)
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

    async def _train_or_fail(self, step: int, stages: "Stages", train: asyncio.Future) -> StepResult:
        """The train step's result, unless a background stage fails first: then its error is the one raised."""
        while True:
            done, _ = await asyncio.wait({train}, timeout=1.0)
            if done:
                return train.result()
            failed = stages.error()
            if failed is not None:
                train.cancel()
                raise RuntimeError(f"{failed[0]} failed while training step {step} waited: {failed[1]}") from failed[1]

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


class Stages:
    """Starts and stops the background stages of one run, and gathers their per-step metrics."""

    def __init__(self, ctl: Controller, metrics: MetricsLogger, gfilter: GroupFilter | None) -> None:
        self.ctl, self.metrics, self.gfilter = ctl, metrics, gfilter
        self.spans = SpanCollector(metrics, ctl.rollouts, ctl.rewarders, ctl.timeout)
        self.tasks: list[asyncio.Task] = []
        self.reward_refs: list[ray.ObjectRef] = []
        self.last = {"t": time.time(), "tokens": 0, "scored": 0, "errors": 0, "gc": 0.0}

    async def start(self) -> None:
        ctl = self.ctl
        self.reward_refs = [w.run.remote() for w in ctl.rewarders]
        for g, missing in ctl.requeue:
            ctl.feeder.requeue(g, missing)
        self.tasks.append(asyncio.create_task(ctl.feeder.run()))
        if self.gfilter is not None:
            self.tasks.append(asyncio.create_task(self.gfilter.run()))

    def error(self) -> tuple[str, BaseException] | None:
        if self.ctl.feeder.error is not None:
            return "rollout", self.ctl.feeder.error
        dead = self._reward_error()
        if dead is not None:
            return dead
        if self.gfilter is not None and self.gfilter.error is not None:
            return "dynamic sampling", self.gfilter.error
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                return "a background stage", t.exception()
        return None

    def _reward_error(self) -> tuple[str, BaseException] | None:
        """A reward worker's run loop ends only when stopped: one that ended before is dead or failed (its
        function could not be imported, it raised, or the process exited); its error names it."""
        if not self.reward_refs:
            return None
        ended, _ = ray.wait(self.reward_refs, num_returns=len(self.reward_refs), timeout=0)
        for ref in ended:
            i = self.reward_refs.index(ref)
            try:
                ray.get(ref, timeout=0)
                why = "its run loop returned before the run stopped it"
                cause: BaseException | None = None
            except Exception as err:  # RayActorError (the process died) or the loop's own exception
                why, cause = death_cause(err), err
            exc = RuntimeError(f"{why} (reward.fn={self.ctl.recipe.reward.fn}; its log is above)")
            exc.__cause__ = cause
            return f"the reward stage (reward worker {i})", exc
        return None

    async def step_metrics(self, m: dict[str, Any]) -> dict[str, Any]:
        """Throughput of each stage since the last step, rewards' extras, queue depths, staleness budget."""
        ctl, now = self.ctl, time.time()
        dt = max(now - self.last["t"], 1e-9)
        rollout = await await_([w.stats.remote() for w in ctl.rollouts], ctl.timeout, "stats", "rollout workers")
        rewards = await await_([w.stats.remote() for w in ctl.rewarders], ctl.timeout, "stats", "reward workers") \
            if ctl.rewarders else [s["reward"] for s in rollout]  # reward.inline: the rollout workers scored
        await self.spans.collect()
        tokens = sum(s["tokens_out"] for s in rollout)
        gc_s = max(s.get("gc_seconds", 0.0) for s in rollout)
        for s in rollout:  # a rollout actor's loop held for long delays every call to it (weight updates too)
            for st in s.get("loop", {}).get("stalls", [])[:1]:
                log.warning("rollout worker %d: its event loop was held for %.2f s; the loop thread was at:\n%s",
                            s["rank"], st["lag_s"], st["stack"])
        scored, errors = sum(s["scored"] for s in rewards), sum(s["errors"] for s in rewards)
        out: dict[str, Any] = {
            "throughput/samples_per_s": m.get("samples", 0) / dt,
            "throughput/gen_tokens_per_s": (tokens - self.last["tokens"]) / dt,
            "throughput/rewarded_per_s": (scored - self.last["scored"]) / dt,
            "reward/errors": errors - self.last["errors"],
            "rollout/gc_pause_s": gc_s - self.last["gc"],  # the busiest engine's collector pauses since the last step
            "rollout/loop_lag_max_s": max(s.get("loop", {}).get("lag_max_s", 0.0) for s in rollout),
            "rollout/groups_running": ctl.budget.running, "rollout/groups_started": ctl.feeder.next_group,
            "rollout/groups_dropped": ctl.budget.dropped, "rollout/engine_failures": len(ctl.router.failures),
        }
        extras: dict[str, list[float]] = {}
        for s in rewards:
            for k, (total, count) in s["extras"].items():
                acc = extras.setdefault(k, [0.0, 0.0])
                acc[0] += total
                acc[1] += count
        out.update({f"reward/extra/{k}": v[0] / v[1] for k, v in extras.items() if v[1]})
        if self.gfilter is not None:
            out.update({"dynamic_sampling/kept_groups": self.gfilter.kept, "dynamic_sampling/dropped_groups": self.gfilter.dropped})
        try:
            out.update(await asyncio.to_thread(ctl.store.metrics))
        except Exception as exc:  # observability must not stop training
            log.warning("data store metrics unavailable: %s", exc)
        self.last = {"t": now, "tokens": tokens, "scored": scored, "errors": errors, "gc": gc_s}
        return out

    async def stop(self) -> None:
        ctl = self.ctl
        if self.gfilter is not None:
            self.gfilter.stopping = True
        for t in self.tasks:
            t.cancel()
        if hasattr(ctl, "feeder"):
            ctl.feeder.stop()
        for w in ctl.rewarders:
            w.stop.remote()
        try:
            await self.spans.collect()
        except Exception:
            pass


def _checkpoint_step(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    digits = "".join(ch for ch in ckpt.name if ch.isdigit())
    return int(digits) if digits else 0


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return out


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
