"""RolloutWorker: a Ray actor that owns one vLLM async engine and streams finished samples to the store.

Token in, token out: prompts arrive as token ids, samples leave as token ids with the engine's per-token
logprobs and the policy version of every token. Each sample is written to the data store the moment it
finishes; there is no batch barrier.

A weight update cuts every in-flight request between two engine steps (vLLM's pause in "abort" mode), loads,
and resumes; each cut request is resubmitted at once with the tokens it has as part of its context, so it
continues on the new weights (AReaL's interruptible rollout). The KV cache of those tokens stays in vLLM's
prefix cache (`update_mode` interrupt), so nothing is computed again but the last partial block. A request
runs as one or more such segments, and each segment ran on exactly one policy version: the version of every
token is exact with any vLLM, and the engine returns each request once, when it ends, instead of streaming
every token through this actor's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict
from typing import Any

import ray

from datastore.client import DataStore
from rl.core.config import RewardConfig, RolloutConfig
from rl.core.heap import GcClock, LoopWatch, settle
from rl.core.plugins import load_function
from rl.core.scoring import WRITE_FIELDS, RewardStats, RewardTally, Sample, make_reward_caller
from rollout.agent import TurnOutput, run_episode
from rollout.records import EvalSample, GroupRequest, GroupResult, RolloutStats, UpdateReport
from rl.core.transport import ChannelSpec, WeightHandle
from rl.core.waits import await_

log = logging.getLogger(__name__)

#: the fields a rollout worker writes for every sample (the store's schema for them)
SAMPLE_FIELDS = [
    "group", "sample", "prompt", "prompt_ids", "response", "response_ids", "logprobs", "token_versions",
    "loss_mask", "version", "finish_reason", "row", "worker", "gen_seconds", "turns",
]


def engine_env(cfg: RolloutConfig, device: str) -> dict[str, str]:
    """Environment the engine process needs (it inherits the actor's)."""
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "0", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(cfg.kv_cache_gib))))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
        # the engine's processes sleep between steps instead of spinning (rollout/vllm_plugin.py)
        env["OMP_NUM_THREADS"] = str(cfg.cpu_threads)
        env["STREAMRL_VLLM_SPIN_SLEEP_S"] = os.environ.get("STREAMRL_VLLM_SPIN_SLEEP_S", "0.003")
    else:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0")
    return env


class RolloutWorker:
    def __init__(self, rank: int, model_path: str, cfg: RolloutConfig, store: DataStore, partition: str,
                 dtype: str = "float32", device: str = "cpu", seed: int = 0, timeout_s: float = 300.0,
                 sleep_mode: bool = False, visible_devices: list[str] | None = None,
                 reward: RewardConfig | None = None) -> None:
        """`sleep_mode`: the engine sleeps while a trainer uses its GPUs (placement timeshare).
        `visible_devices`: the GPUs of a tensor-parallel engine that shares them with trainer ranks (Ray gives
        this actor one; its vLLM workers need all of them). `reward` with `inline`: each sample is scored
        here as it finishes and stored with its reward (`reward.inline`)."""
        self.rank, self.model_path, self.cfg, self.store, self.partition = rank, model_path, cfg, store, partition
        self.sleep_mode, self.visible_devices = sleep_mode, visible_devices
        self.dtype, self.device, self.seed, self.timeout_s = dtype, device, seed, timeout_s
        self.version = 0
        self.engine: Any = None
        self.inflight = 0
        self.tokens_out = 0
        self.samples_out = 0
        self.cached_tokens = 0  # prompt tokens served from vLLM's prefix cache (multi-turn, shared prompts)
        self.update_lock = asyncio.Lock()  # one weight update at a time
        # Orders request submissions against weight updates: a segment's request reaches the engine wholly
        # before an update's pause (and is cut by it) or after the new weights are loaded, never in between,
        # so the version read under the gate is the one that computes every token of the segment.
        self.gate = asyncio.Lock()
        self.epoch = 0  # weight updates that cut in-flight requests so far
        self.active = 0  # segments in the engine now
        self.resubmitted = 0  # segments continued after a cut
        self.pending: list[tuple[int, dict[str, Any], asyncio.Future]] = []
        self.healthy, self.last_error = True, ""
        self.agent_hook = load_function(cfg.agent.fn, "rollout.agent.fn") if cfg.agent.fn else None
        self.tokenizer: Any = None
        self.asleep: set[str] = set()  # placement timeshare: what of the engine is asleep
        self.flusher: asyncio.Task | None = None
        self.events: list[dict] = []  # (kind, start, end) activity spans for the timeline
        self.busy_since: float | None = None
        self.gc = GcClock()
        self.loop_watch = LoopWatch()  # started with the engine: how long this actor's loop was held, and where
        inline = reward is not None and reward.inline
        self.reward = make_reward_caller(reward) if inline else None
        self.tally = RewardTally()
        self.fields = SAMPLE_FIELDS + (WRITE_FIELDS if inline else [])
        self.eval_reward: Any = None  # the eval reward caller (`eval.reward_fn`), made on the first eval call
        self.eval_reward_fn = ""
        self.updating: asyncio.Task | None = None  # the weight update in progress

    async def start(self) -> dict[str, Any]:
        """Build the engine; returns how long that took."""
        os.environ.update(engine_env(self.cfg, self.device))
        if self.visible_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(self.visible_devices)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        args = AsyncEngineArgs(
            model=self.model_path,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            dtype=self.dtype,
            max_model_len=self.cfg.max_model_len,
            max_num_seqs=self.cfg.max_num_seqs,
            enforce_eager=self.cfg.enforce_eager,
            seed=self.seed + self.rank,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            worker_extension_cls="rollout.engine_ext.StreamRLWorkerExtension",
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,  # a request cut by a weight update continues from its cached KV
            distributed_executor_backend="mp" if self.cfg.tensor_parallel_size > 1 else None,
            disable_log_stats=True,
            enable_sleep_mode=self.sleep_mode and self.device == "cuda",  # sleep/wake needs vLLM's allocator
        )
        self.engine = AsyncLLM.from_engine_args(args)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        await self._turn([self.tokenizer.bos_token_id or 0], 1, 0, "warmup")  # first request pays one-off costs
        settle()  # full collections while generating stop this actor's loop for far less (rl/core/heap.py)
        if self.loop_watch._task is None:
            self.loop_watch.start()
        return {"rank": self.rank, "start_seconds": time.perf_counter() - t0, "pid": os.getpid()}

    @property
    def _engine_detok(self) -> bool:
        """vLLM detokenizes token by token as it generates, in this actor's event loop; only stop strings
        need that. Without them a turn is decoded once, at its end (1 call instead of one per token)."""
        return self.cfg.detokenize and bool(self.cfg.stop)

    def _sampling_params(self, seed: int | None, max_tokens: int, temperature: float | None = None):
        """`temperature`: an eval round's (0 = greedy); None = rollout.temperature."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        c = self.cfg
        return SamplingParams(
            n=1, temperature=c.temperature if temperature is None else temperature, top_p=c.top_p,
            top_k=c.top_k if c.top_k > 0 else 0,
            max_tokens=max_tokens, stop=list(c.stop) or None, logprobs=0, seed=seed if c.seed_requests else None,
            output_kind=RequestOutputKind.FINAL_ONLY, skip_special_tokens=True, detokenize=self._engine_detok,
            include_stop_str_in_output=True, ignore_eos=c.ignore_eos,
        )

    async def _turn(self, context: list[int], max_tokens: int, seed: int, tag: str,
                    temperature: float | None = None) -> TurnOutput:
        """One model turn: token ids in, token ids + logprobs + per-token versions out. A weight update cuts
        it into segments (see the module docstring); each segment's tokens carry the version it ran on."""
        ids: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        text, finish, k = "", "", 0
        while True:
            comp, version, cut = await self._segment(context + ids, max_tokens - len(ids), seed + 104_729 * k,
                                                     f"{tag}-k{k}", temperature)
            new = list(comp.token_ids)
            ids += new
            logprobs += [float(step[tok].logprob) for tok, step in zip(new, comp.logprobs or [])]
            versions += [version] * len(new)
            text += comp.text if self._engine_detok else ""
            finish = comp.finish_reason or ""
            if not cut or len(ids) >= max_tokens:
                break
            k += 1
            self.resubmitted += 1
        if self.cfg.detokenize and (k or not self._engine_detok):  # one decode of the whole turn (a character
            text = self.tokenizer.decode(ids, skip_special_tokens=True)  # may span a cut)
        if len(ids) >= max_tokens and finish == "abort":
            finish = "length"
        return TurnOutput(ids, logprobs, versions, text, finish)

    async def _segment(self, context: list[int], max_tokens: int, seed: int, tag: str,
                       temperature: float | None = None) -> tuple[Any, int, bool]:
        """Run one request until it ends or a weight update cuts it. Returns its completion, the policy
        version it ran on, and whether an update cut it (then the caller continues it)."""
        async with self.gate:  # never between an update's pause and its load (see __init__)
            version, epoch = self.version, self.epoch
            queue = await self.engine.add_request(f"{tag}-{uuid.uuid4().hex[:8]}", {"prompt_token_ids": context},
                                                  self._sampling_params(seed, max_tokens, temperature))
        self.active += 1
        try:
            out = queue.get_nowait() or await queue.get()
            while not out.finished:
                out = queue.get_nowait() or await queue.get()
        except asyncio.CancelledError:
            await self.engine.abort(queue.request_id, internal=True)
            raise
        finally:
            self.active -= 1
        self.cached_tokens += getattr(out, "num_cached_tokens", 0) or 0
        comp = out.outputs[0]
        return comp, version, comp.finish_reason == "abort" and self.epoch > epoch

    async def _one(self, req: GroupRequest, j: int) -> dict[str, Any]:
        row, row_fields = await self._episode(req, j, self.cfg.max_tokens, None, "g")
        if self.reward is not None:  # reward.inline: scored here, stored with the sample
            sample = self._sample(req, j, row, row_fields)
            row.update({k: v[0] for k, v in self.tally.add([sample], [await self.reward.score(sample)]).items()})
        await self._put(req.group * req.n + j, row)
        self.tokens_out += int(sum(row["loss_mask"]))
        self.samples_out += 1
        return row

    async def _episode(self, req: GroupRequest, j: int, max_tokens: int, temperature: float | None,
                       tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Sample j of the group (every turn of it): the stored row, and the dataset row's fields."""
        index = req.group * req.n + j
        t0 = time.perf_counter()
        seed = self.seed * 1_000_003 + index
        turn_no = 0

        async def generate(context: list[int], max_new: int) -> TurnOutput:
            nonlocal turn_no
            turn_no += 1
            return await self._turn(context, max_new, seed + 7919 * (turn_no - 1),
                                    f"{tag}{req.group}-s{j}-t{turn_no}", temperature)

        row_fields = json.loads(req.row) if req.row else {}
        ep = await run_episode(generate, req.prompt, req.prompt_ids, row_fields, max_tokens,
                               self.cfg.agent, self.agent_hook, self._tokenize, lambda: self.version,
                               max_context=self.cfg.max_model_len)
        row = {
            "group": req.group, "sample": j, "prompt": req.prompt, "prompt_ids": list(req.prompt_ids),
            "response": ep.text, "response_ids": ep.response_ids, "logprobs": ep.logprobs,
            "token_versions": ep.token_versions, "loss_mask": ep.loss_mask,
            "version": min(ep.token_versions) if ep.token_versions else self.version,
            "finish_reason": ep.finish_reason, "row": req.row, "worker": self.rank,
            "gen_seconds": time.perf_counter() - t0, "turns": ep.turns,
        }
        return row, row_fields

    @staticmethod
    def _sample(req: GroupRequest, j: int, row: dict[str, Any], row_fields: dict[str, Any]) -> Sample:
        """What the reward function sees of a finished sample."""
        return Sample(prompt=req.prompt, response=row["response"], prompt_ids=row["prompt_ids"],
                      response_ids=row["response_ids"], row=row_fields, index=req.group * req.n + j,
                      finish_reason=row["finish_reason"])

    async def evaluate_group(self, req: GroupRequest, temperature: float, max_tokens: int,
                             reward: RewardConfig) -> list[EvalSample]:
        """An eval prompt's samples, scored with `reward.fn` and returned: never written to the store, never
        counted in this worker's rollout stats. Each keeps its per-token policy versions (a weight update
        may cut it like any request; then its tokens span two versions)."""
        if not self.healthy:
            raise RuntimeError(f"rollout worker {self.rank}'s engine is down: {self.last_error}")
        if self.eval_reward is None or self.eval_reward_fn != reward.fn:
            self.eval_reward, self.eval_reward_fn = make_reward_caller(reward), reward.fn
        start = time.time()
        episodes = await asyncio.gather(*[self._episode(req, j, max_tokens, temperature, "eval")
                                          for j in req.sample_ids()])
        self.events.append({"kind": "eval", "start": start, "end": time.time()})  # the timeline's eval spans
        samples = [self._sample(req, j, row, fields) for j, (row, fields) in zip(req.sample_ids(), episodes)]
        scores = await self.eval_reward.score_many(samples)
        return [EvalSample(prompt_no=req.group, sample=row["sample"], prompt=row["prompt"], response=row["response"],
                           score=s.score, reward_info=s.error, row=row["row"], finish_reason=row["finish_reason"],
                           version=row["version"], version_max=max(row["token_versions"], default=row["version"]),
                           tokens=len(row["response_ids"]), worker=self.rank)
                for (row, _), s in zip(episodes, scores)]

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def _put(self, index: int, row: dict[str, Any]) -> None:
        """Send a finished sample to the store at once; samples finishing while a put is under way go
        together in the next put (no timer, so an idle worker adds no latency)."""
        done = asyncio.get_running_loop().create_future()
        self.pending.append((index, row, done))
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                await self.store.aput(self.partition, [i for i, _, _ in batch],
                                      {k: [r[k] for _, r, _ in batch] for k in self.fields})
            except BaseException as exc:  # the waiting samples see the error
                for _, _, done in batch:
                    done.set_exception(exc)
                continue
            for _, _, done in batch:
                done.set_result(None)

    async def generate_group(self, req: GroupRequest) -> GroupResult:
        """Sample the group (or the listed samples of it); each sample goes to the store when it finishes.

        Returns the samples `done` and, if the engine failed, the samples `failed` and the `error`; the
        caller re-queues failed samples elsewhere (nothing lost, nothing duplicated)."""
        if not self.healthy:
            return GroupResult(req.group, done=[], failed=req.sample_ids(),
                               error=f"rollout worker {self.rank}'s engine is down: {self.last_error}")
        ids = req.sample_ids()
        if self.inflight == 0:
            self.busy_since = time.time()  # the engine goes from idle to generating
        self.inflight += len(ids)
        try:
            results = await asyncio.gather(*[self._one(req, j) for j in ids], return_exceptions=True)
        finally:
            self.inflight -= len(ids)
            if self.inflight == 0 and self.busy_since is not None:
                self.events.append({"kind": "generate", "start": self.busy_since, "end": time.time()})
                self.busy_since = None
        done = [j for j, r in zip(ids, results) if not isinstance(r, BaseException)]
        failed = [j for j, r in zip(ids, results) if isinstance(r, BaseException)]
        error = ""
        if failed:
            exc = next(r for r in results if isinstance(r, BaseException))
            error = f"{type(exc).__name__}: {exc}"
            if self.engine is None or getattr(self.engine, "errored", False):
                self.healthy, self.last_error = False, error
                log.error("rollout worker %d: engine died (%s); %d samples of group %d to re-queue",
                          self.rank, error, len(failed), req.group)
            elif not isinstance(exc, asyncio.CancelledError):
                raise exc
        return GroupResult(req.group, done=done, failed=failed, error=error,
                           tokens=sum(len(r["response_ids"]) for r in results if isinstance(r, dict)))

    async def restart_engine(self) -> dict[str, Any]:
        """Replace a dead engine with a fresh one (at the model directory's weights: the controller's
        next weight sync brings it to the current version before it gets work again)."""
        if self.updating is not None and not self.updating.done():  # it holds the gate the new engine's
            self.updating.cancel()  # warm-up request needs, waiting on an engine that will never answer
        if self.engine is not None:
            try:
                self.engine.shutdown()
            except Exception:
                pass
            self.engine = None
        self.version = 0
        info = await self.start()
        self.healthy, self.last_error = True, ""
        return info

    async def engine_pid(self) -> int:
        """The engine core process id (tests kill it to check failure handling)."""
        proc = getattr(self.engine.engine_core, "resources", None)
        procs = getattr(getattr(proc, "engine_manager", None), "processes", None) or []
        return procs[0].pid if procs else -1

    async def sleep(self, level: int = 1) -> None:
        """Colocated mode: free the KV cache (and offload, level 1, or drop, level 2, the weights)."""
        await self.engine.sleep(level=level)
        self.asleep = {"weights", "kv_cache"}

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Wake what is still asleep (a weight update may have woken the weights already: waking them
        twice is an error in vLLM's allocator)."""
        todo = [t for t in (tags or ["weights", "kv_cache"]) if t in self.asleep]
        if todo:
            await self.engine.wake_up(tags=todo)
            self.asleep -= set(todo)

    async def init_weight_channel(self, spec: ChannelSpec, first_rank: int) -> dict[str, Any]:
        """Every worker process of the engine joins the trainer's weight channel as group ranks
        first_rank .. first_rank + tp - 1 (blocks until the trainer's rank 0 joins too)."""
        res = await await_(self.engine.collective_rpc("streamrl_join_weight_channel", args=(asdict(spec), first_rank)),
                           spec.timeout_s + 30, f"joining the {spec.kind} weight channel as ranks from {first_rank}",
                           f"rollout worker {self.rank}'s vLLM engine")
        return {"rank": self.rank, "members": res}

    async def update_weights(self, handle: WeightHandle) -> UpdateReport:
        """Cut in-flight requests between engine steps, receive and load, resume (`rollout.update_mode`:
        interrupt and recompute cut every request and resubmit it with its tokens so far, interrupt reusing
        the cached KV and recompute dropping every cache first; drain lets in-flight requests finish on the
        old weights, then drops the caches). No request is submitted while this runs (`self.gate`). On a
        streaming channel the trainer sends at the same time and the version arrives in band. A probe moves
        the bytes and loads nothing."""
        asked = handle.meta.get("asked_at")
        dispatch = max(time.time() - asked, 0.0) if asked else 0.0  # from the controller's call to here
        self.updating = asyncio.current_task()  # restart_engine cancels it: a dead engine never answers it
        try:
            return await self._update_weights(handle, dispatch)
        finally:
            self.updating = None

    async def _update_weights(self, handle: WeightHandle, dispatch: float) -> UpdateReport:
        async with self.update_lock:
            t0 = time.perf_counter()
            cut, t_pause = self.active, 0.0
            async with contextlib.AsyncExitStack() as stack:
                if not handle.probe:
                    await stack.enter_async_context(self.gate)
                    drain = self.cfg.update_mode == "drain"
                    if not drain:
                        self.epoch += 1  # segments started before this point and cut by it are continued
                    await self._pause("wait" if drain else "abort", clear_cache=self.cfg.update_mode != "interrupt")
                    t_pause = time.perf_counter() - t0
                    if "weights" in self.asleep:  # timeshare: weights must be resident to load into
                        await self.wake_up(["weights"])
                try:
                    res = await await_(self.engine.collective_rpc("streamrl_load_weights", args=(asdict(handle),)),
                                       self.timeout_s, f"weight load ({handle.kind}, version "
                                       f"{handle.version if handle.version >= 0 else 'from the trainer'})",
                                       f"rollout worker {self.rank}'s vLLM engine")
                    versions = {r["version"] for r in res}
                    if len(versions) != 1:
                        raise RuntimeError(f"rollout worker {self.rank}: its workers loaded different versions {versions}")
                    version = versions.pop()
                    if not handle.probe:
                        self.version = version
                finally:
                    if not handle.probe:
                        await self.engine.resume_generation()
            t1 = time.perf_counter()
            if not handle.probe:
                self.events.append({"kind": "load_weights", "start": time.time() - (t1 - t0), "end": time.time()})
            return UpdateReport(
                rank=self.rank, version=version, seconds=t1 - t0, pause_seconds=t_pause, dispatch_seconds=dispatch,
                cut_requests=cut if not handle.probe and self.cfg.update_mode != "drain" else 0,
                load_seconds=max(r["seconds"] for r in res), recv_seconds=max(r["recv_s"] for r in res),
                apply_seconds=max(r["load_s"] for r in res), bytes=res[0]["bytes"])

    async def _pause(self, mode: str, clear_cache: bool) -> None:
        """vLLM's `pause_generation` without the 20 ms sleep it ends with (that sleep only lets the cut
        requests' last outputs arrive before it returns; each segment waits for its own anyway): on the CPU
        default `sync/pause_s` went from 23 to 3 ms of a ~45 ms sync. Falls back to the public call."""
        core = getattr(self.engine, "engine_core", None)
        if not hasattr(core, "pause_scheduler_async"):
            await self.engine.pause_generation(mode=mode, clear_cache=clear_cache)
            return
        if clear_cache and hasattr(getattr(self.engine, "renderer", None), "clear_mm_cache_async"):
            await self.engine.renderer.clear_mm_cache_async()
        await core.pause_scheduler_async(mode=mode, clear_cache=clear_cache)

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """The engine's logprob of each token of `token_ids` given the tokens before it (None for the
        first): the engine's view of a fixed sequence, to compare with the trainer's."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        final = None
        async for out in self.engine.generate({"prompt_token_ids": list(token_ids)}, params,
                                              request_id=f"plp-{uuid.uuid4().hex[:8]}"):
            final = out
        out = []
        for tok, step in zip(token_ids, final.prompt_logprobs):
            out.append(None if step is None else float(step[tok].logprob))
        return out

    async def weight_digest(self) -> str:
        return (await self.engine.collective_rpc("streamrl_weight_digest"))[0]

    async def drain_spans(self) -> list[dict[str, Any]]:
        """Activity spans since the last call (an ongoing generate span is cut here and continues)."""
        now = time.time()
        if self.busy_since is not None:
            self.events.append({"kind": "generate", "start": self.busy_since, "end": now})
            self.busy_since = now
        out, self.events = self.events, []
        return out

    async def health(self) -> tuple[bool, str]:
        """Whether its engine is up (False once the EngineCore died, until restart_engine), and why not."""
        up = self.healthy and self.engine is not None and not getattr(self.engine, "errored", False)
        return up, "" if up else (self.last_error or "its vLLM engine is down")

    async def stats(self) -> RolloutStats:
        loop = self.loop_watch.take()
        return RolloutStats(rank=self.rank, version=self.version, inflight=self.inflight, tokens_out=self.tokens_out,
                            samples_out=self.samples_out, cached_tokens=self.cached_tokens, resubmitted=self.resubmitted,
                            gc_seconds=self.gc.seconds, gc_full=self.gc.full, loop_lag_max_s=loop["lag_max_s"],
                            loop_stalls=loop["stalls"], reward=self._reward_stats())

    def _reward_stats(self) -> RewardStats:
        out = self.tally.stats()
        out.abandoned = self.reward.abandoned if self.reward is not None else 0
        return out

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


# no task events: Ray's GCS would keep one per call of this actor's methods, all run long (issue 19)
RolloutActor = ray.remote(num_cpus=1, max_concurrency=10_000, enable_task_events=False)(RolloutWorker)


def stop_workers(workers: list[Any], timeout_s: float = 60.0) -> None:
    """Shut every engine down (best effort: a dead one is skipped) and kill its actor, so its GPU memory
    and processes are gone before the next engine starts (tests and benchmarks start several in a row)."""
    for w in workers:
        try:
            ray.get(w.shutdown.remote(), timeout=timeout_s)
        except Exception:
            pass
        ray.kill(w)
