"""The single controller: builds the actors, then runs the staleness-bounded asynchronous schedule.

    feeder (background): while the budget allows, draw prompts and start groups on rollout workers
    reward workers (background): score finished samples as they stream into the store
    loop: train a step on B ready groups -> push the new weights to every engine -> log

Rollout never waits for training and training never waits for the slowest rollout; only the staleness
budget (rl.staleness) holds the feeder back. Every sample carries the policy version that made it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from datastore.client import DataStore
from rl.config import Recipe, resolve_run_dir, to_yaml
from rl.data import PromptFormatter, PromptStream, row_to_json, synthetic_task
from rl.metrics import MetricsLogger, learning_summary, read_metrics
from rl.models import load_tokenizer, resolve_model_path
from rl.reward_worker import READ_FIELDS, WRITE_FIELDS, RewardActor
from rl.staleness import StalenessBudget
from rl.transport import WeightHandle, pick_transport
from rl.waits import WaitTimeout, await_, wait
from rollout.router import RolloutRouter
from rollout.worker import SAMPLE_FIELDS, GroupRequest, RolloutActor
from trainer.group import TrainerGroup

log = logging.getLogger(__name__)

PARTITION = "train"
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1"}


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init_ray(r: Recipe) -> None:
    """Join the cluster named in the recipe or RAY_ADDRESS (set inside a Ray job); otherwise start a fresh
    local instance (never silently join some other cluster started on this machine)."""
    address = r.resources.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=True)
        return
    needed = 2 * (r.rollout.num_engines + r.trainer.world_size) + 1
    ray.init(address="local", num_cpus=r.resources.num_cpus or max(needed, os.cpu_count() or 1),
             include_dashboard=False, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=True)


def spawn_rollout_workers(r: Recipe, model_path: str, store: DataStore, device: str) -> list[ray.actor.ActorHandle]:
    """One RolloutWorker per engine, each on its own placement-group bundle of `tp` GPUs (or a CPU)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    tp = r.rollout.tensor_parallel_size
    gpus = tp if device == "cuda" else 0
    bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {})}
    pg = placement_group([bundle] * r.rollout.num_engines, strategy="PACK")
    wait(pg.ready(), r.resources.wait_timeout_s, f"a placement group of {r.rollout.num_engines} x {bundle} for rollout",
         "the Ray cluster", hint="the cluster may not have these resources free")
    return [RolloutActor.options(num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
            .remote(i, model_path, r.rollout, store, PARTITION, r.model.dtype, device, r.seed,
                    r.resources.wait_timeout_s) for i in range(r.rollout.num_engines)]


class Controller:
    def __init__(self, recipe: Recipe, run_dir: Path | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir else resolve_run_dir(recipe)
        self.device = pick_device(recipe.resources.device)
        self.timeout = recipe.resources.wait_timeout_s
        self.version = 0
        self.budget = StalenessBudget(recipe.trainer.batch_groups, recipe.algorithm.eta)
        self.wake = asyncio.Event()
        self.group_tasks: set[asyncio.Task] = set()
        self.feeder_error: BaseException | None = None

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        r = self.recipe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(r))
        self.task = synthetic_task(r.data)
        self.model_path = resolve_model_path(r.model, self.task)
        self.tokenizer = load_tokenizer(self.model_path)
        self.prompts = PromptStream(r.data, r.seed)
        self.format_prompt = PromptFormatter(r.data, self.tokenizer)
        if not ray.is_initialized():
            init_ray(r)
        self.store = DataStore.create(r.datastore.num_storage_units, tag_fields=["version"],
                                      declared_fields=SAMPLE_FIELDS + WRITE_FIELDS, timeout_s=self.timeout)
        self.rollouts = spawn_rollout_workers(r, self.model_path, self.store, self.device)
        self.rewarders = [RewardActor.remote(i, r.reward, self.store, PARTITION) for i in range(r.reward.num_workers)]
        self.trainer = TrainerGroup(r, self.model_path, self.store, PARTITION, self.device)
        started = wait([w.start.remote() for w in self.rollouts], self.timeout, "vLLM engine start",
                       f"rollout workers 0..{len(self.rollouts) - 1}")
        log.info("rollout engines started: %s", started)
        log.info("trainer ranks ready: %s", self.trainer.setup())
        self._open_weight_channel()
        self.router = RolloutRouter(self.rollouts, r.rollout.max_tokens, self.timeout)

    # ------------------------------------------------------------------ rollout feeding
    async def _feed(self) -> None:
        """Start groups whenever the staleness budget has room; never waits for training."""
        n = self.recipe.rollout.group_size
        try:
            while True:
                cap = self.budget.capacity(self.version)
                for row in self.prompts.take(cap):
                    group = self.budget.submitted
                    self.budget.on_submit()
                    prompt = self.format_prompt(row)
                    ids = self.tokenizer(prompt, add_special_tokens=not self.recipe.data.chat_template)["input_ids"]
                    req = GroupRequest(group=group, prompt=prompt, prompt_ids=ids, row=row_to_json(row), n=n)
                    task = asyncio.create_task(self._run_group(req))
                    self.group_tasks.add(task)
                    task.add_done_callback(self.group_tasks.discard)
                self.wake.clear()
                await self.wake.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.feeder_error = exc
            raise

    async def _run_group(self, req: GroupRequest) -> None:
        try:
            await self.router.run_group(req)
        except BaseException as exc:
            self.feeder_error = exc
            raise
        finally:
            self.budget.on_finish()
            self.wake.set()

    # ------------------------------------------------------------------ the loop
    def _open_weight_channel(self, engines: list[int] | None = None) -> None:
        """After the engines and the trainer start (and again when the set of live engines changes): the
        trainer's rank 0 opens the weight channel and every worker of the listed engines joins it, all at
        once (a process group forms only when all its members arrive)."""
        r = self.recipe
        engines = list(range(len(self.rollouts))) if engines is None else engines
        tp = r.rollout.tensor_parallel_size
        kind = pick_transport(r.rollout.weight_transport, self.device, colocated=r.rollout.colocate)
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
                "sync/bytes": float(handle.nbytes)}

    async def run_async(self) -> list[dict[str, Any]]:
        r = self.recipe
        total = r.trainer.total_steps
        metrics = MetricsLogger(self.run_dir, r.logging, total)
        feeder = asyncio.create_task(self._feed())
        reward_runs = [w.run.remote() for w in self.rewarders]
        records = []
        last_t, last_tokens = time.time(), 0
        try:
            for step in range(total):
                with metrics.phase("train"):
                    m = await self._train_or_fail(step, feeder)
                self.budget.on_drop(int(m.get("staleness/dropped_groups", 0)))
                with metrics.phase("sync"):
                    m.update(await self._sync_weights())
                self.version = step + 1
                self.wake.set()
                now = time.time()
                stats = await await_([w.stats.remote() for w in self.rollouts], self.timeout, "stats", "rollout workers")
                tokens = sum(s["tokens_out"] for s in stats)
                m["throughput/samples_per_s"] = m["samples"] / max(now - last_t, 1e-9)
                m["throughput/gen_tokens_per_s"] = (tokens - last_tokens) / max(now - last_t, 1e-9)
                m["rollout/groups_running"] = self.budget.running
                m["rollout/groups_started"] = self.budget.submitted
                last_t, last_tokens = now, tokens
                records.append(metrics.log(step, m))
        finally:
            feeder.cancel()
            for t in list(self.group_tasks):
                t.cancel()
            for w in self.rewarders:
                w.stop.remote()
            metrics.close()
        summary = learning_summary(records)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return records

    async def _train_or_fail(self, step: int, feeder: asyncio.Task) -> dict[str, Any]:
        """A train step, unless the feeder fails first: then its error is the one raised."""
        train = asyncio.ensure_future(self.trainer.train_step(step))
        while True:
            done, _ = await asyncio.wait({train}, timeout=1.0)
            if done:
                return train.result()
            if self.feeder_error is not None:
                train.cancel()
                raise RuntimeError(f"rollout failed while training step {step} waited: {self.feeder_error}") \
                    from self.feeder_error

    def run(self) -> list[dict[str, Any]]:
        return asyncio.run(self.run_async())

    def shutdown(self) -> None:
        for w in self.rollouts:
            try:
                wait(w.shutdown.remote(), 60, "engine shutdown", "a rollout worker")
            except Exception:
                pass
        self.trainer.shutdown()


def run_recipe(recipe: Recipe, run_dir: Path | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """Build, run and tear down; returns the run directory and every step's metrics."""
    ctl = Controller(recipe, run_dir)
    ctl.build()
    try:
        records = ctl.run()
    finally:
        ctl.shutdown()
    return ctl.run_dir, records
