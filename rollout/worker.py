"""RolloutWorker: a Ray actor that owns one vLLM async engine and streams finished samples to the store.

Token in, token out: prompts arrive as token ids, samples leave as token ids with the engine's per-token
logprobs and the policy version of every token. Each sample is written to the data store the moment it
finishes; there is no batch barrier. A weight update pauses the engine between steps, loads, and resumes:
unfinished requests keep their tokens and continue on the new weights (AReaL's interruptible rollout),
and the per-token versions show where the switch happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray

from datastore.client import DataStore
from rl.config import RolloutConfig
from rl.plugins import load_function
from rollout.agent import TurnOutput, run_episode
from rl.transport import ChannelSpec, WeightHandle
from rl.waits import await_

log = logging.getLogger(__name__)

#: the fields a rollout worker writes for every sample (the store's schema for them)
SAMPLE_FIELDS = [
    "group", "sample", "prompt", "prompt_ids", "response", "response_ids", "logprobs", "token_versions",
    "loss_mask", "version", "finish_reason", "row", "worker", "gen_seconds", "turns",
]


@dataclass
class GroupRequest:
    """One prompt to be sampled `n` times; sample j of group g is row g * n + j of the partition.
    `samples` limits the request to some j (a re-queue after an engine failure); None means all n."""

    group: int
    prompt: str
    prompt_ids: list[int]
    row: str  # the dataset row's other fields, as JSON
    n: int
    samples: list[int] | None = None

    def sample_ids(self) -> list[int]:
        return list(range(self.n)) if self.samples is None else list(self.samples)


def engine_env(cfg: RolloutConfig, device: str) -> dict[str, str]:
    """Environment the engine process needs (it inherits the actor's)."""
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "0", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(cfg.kv_cache_gib))))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    else:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0")
    return env


class RolloutWorker:
    def __init__(self, rank: int, model_path: str, cfg: RolloutConfig, store: DataStore, partition: str,
                 dtype: str = "float32", device: str = "cpu", seed: int = 0, timeout_s: float = 300.0) -> None:
        self.rank, self.model_path, self.cfg, self.store, self.partition = rank, model_path, cfg, store, partition
        self.dtype, self.device, self.seed, self.timeout_s = dtype, device, seed, timeout_s
        self.version = 0
        self.engine: Any = None
        self.inflight = 0
        self.tokens_out = 0
        self.samples_out = 0
        self.cached_tokens = 0  # prompt tokens served from vLLM's prefix cache (multi-turn, shared prompts)
        self.update_lock = asyncio.Lock()
        self.pending: list[tuple[int, dict[str, Any], asyncio.Future]] = []
        self.healthy, self.last_error = True, ""
        self.agent_hook = load_function(cfg.agent.fn, "rollout.agent.fn") if cfg.agent.fn else None
        self.tokenizer: Any = None
        self.native_versions = False  # the engine labels tokens with weight versions (vLLM >= 0.32)
        self.asleep: set[str] = set()  # colocated mode: what of the engine is asleep
        self.flusher: asyncio.Task | None = None
        self.events: list[dict] = []  # (kind, start, end) activity spans for the timeline
        self.busy_since: float | None = None

    async def start(self) -> dict[str, Any]:
        """Build the engine; returns how long that took."""
        os.environ.update(engine_env(self.cfg, self.device))
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
            enable_prefix_caching=self.cfg.agent.fn is not None,  # multi-turn contexts share prefixes
            distributed_executor_backend="mp" if self.cfg.tensor_parallel_size > 1 else None,
            disable_log_stats=True,
            enable_sleep_mode=self.cfg.colocate and self.device == "cuda",  # sleep/wake needs vLLM's allocator
        )
        self.engine = AsyncLLM.from_engine_args(args)
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.native_versions = hasattr(self.engine, "update_weight_version") and not os.environ.get("STREAMRL_NO_NATIVE_VERSIONS")
        if self.native_versions:
            await self.engine.update_weight_version(str(self.version))
        await self._turn([self.tokenizer.bos_token_id or 0], 1, 0, "warmup")  # first request pays one-off costs
        return {"rank": self.rank, "start_seconds": time.perf_counter() - t0, "pid": os.getpid()}

    def _sampling_params(self, seed: int | None, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        c = self.cfg
        kind = RequestOutputKind.FINAL_ONLY if self.native_versions else RequestOutputKind.DELTA
        return SamplingParams(
            n=1, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k if c.top_k > 0 else 0,
            max_tokens=max_tokens, stop=list(c.stop) or None, logprobs=0, seed=seed if c.seed_requests else None,
            output_kind=kind, skip_special_tokens=True, detokenize=c.detokenize,
            include_stop_str_in_output=True, ignore_eos=c.ignore_eos,
        )

    async def _turn(self, context: list[int], max_tokens: int, seed: int, tag: str) -> TurnOutput:
        """One engine request: token ids in, token ids + logprobs + per-token versions out.

        Per-token versions come from the engine's weight-version spans where vLLM has them (0.32+: exact to
        the engine step); otherwise the request streams and each token takes the version the worker had
        loaded when the token arrived (a token sampled just before a pause can be labelled one newer)."""
        start_version = self.version
        ids: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        text, finish, final, cached = "", "", None, 0
        async for out in self.engine.generate({"prompt_token_ids": context}, self._sampling_params(seed, max_tokens),
                                              request_id=f"{tag}-{uuid.uuid4().hex[:8]}"):
            comp = out.outputs[0]
            new = list(comp.token_ids)
            ids += new
            logprobs += [float(step[tok].logprob) for tok, step in zip(new, comp.logprobs or [])]
            versions += [self.version] * len(new)
            text += comp.text if self.cfg.detokenize else ""
            finish, final = comp.finish_reason or finish, comp
            cached = getattr(out, "num_cached_tokens", 0) or 0
        assert final is not None
        self.cached_tokens += cached
        if self.native_versions:  # FINAL_ONLY: one output holding everything, with the engine's spans
            versions = _token_versions(final, len(ids), start_version)
        return TurnOutput(ids, logprobs, versions, text, finish)

    async def _one(self, req: GroupRequest, j: int) -> dict[str, Any]:
        index = req.group * req.n + j
        t0 = time.perf_counter()
        seed = self.seed * 1_000_003 + index
        turn_no = 0

        async def generate(context: list[int], max_tokens: int) -> TurnOutput:
            nonlocal turn_no
            turn_no += 1
            return await self._turn(context, max_tokens, seed + 7919 * (turn_no - 1), f"g{req.group}-s{j}-t{turn_no}")

        row_fields = json.loads(req.row) if req.row else {}
        ep = await run_episode(generate, req.prompt, req.prompt_ids, row_fields, self.cfg.max_tokens,
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
        await self._put(index, row)
        self.tokens_out += int(sum(ep.loss_mask))
        self.samples_out += 1
        return row

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
                                      {k: [r[k] for _, r, _ in batch] for k in SAMPLE_FIELDS})
            except BaseException as exc:  # the waiting samples see the error
                for _, _, done in batch:
                    done.set_exception(exc)
                continue
            for _, _, done in batch:
                done.set_result(None)

    async def generate_group(self, req: GroupRequest) -> dict[str, Any]:
        """Sample the group (or the listed samples of it); each sample goes to the store when it finishes.

        Returns a summary with the samples `done` and, if the engine failed, the samples `failed` and the
        `error`; the caller re-queues failed samples elsewhere (nothing lost, nothing duplicated)."""
        if not self.healthy:
            return {"group": req.group, "done": [], "failed": req.sample_ids(), "tokens": 0,
                    "error": f"rollout worker {self.rank}'s engine is down: {self.last_error}"}
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
        return {"group": req.group, "done": done, "failed": failed, "error": error,
                "tokens": sum(len(r["response_ids"]) for r in results if isinstance(r, dict))}

    async def restart_engine(self) -> dict[str, Any]:
        """Replace a dead engine with a fresh one (at the model directory's weights: the controller's
        next weight sync brings it to the current version before it gets work again)."""
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

    async def update_weights(self, handle: WeightHandle) -> dict[str, Any]:
        """Pause between engine steps, receive and load, resume (`rollout.update_mode`: interrupt keeps
        in-flight requests and every cached KV; recompute keeps the requests but drops the KV, so they
        re-prefill on the new weights; drain lets them finish, then drops the caches). On a streaming
        channel the trainer sends at the same time and the version arrives in band. A probe moves the
        bytes and loads nothing."""
        async with self.update_lock:
            t0 = time.perf_counter()
            if not handle.probe:
                mode = "wait" if self.cfg.update_mode == "drain" else "keep"
                await self.engine.pause_generation(mode=mode, clear_cache=self.cfg.update_mode != "interrupt")
                if "weights" in self.asleep:  # colocated: weights must be resident to load into
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
                    if self.native_versions:
                        await self.engine.update_weight_version(str(version))
                    self.version = version
            finally:
                if not handle.probe:
                    await self.engine.resume_generation()
            t1 = time.perf_counter()
            if not handle.probe:
                self.events.append({"kind": "load_weights", "start": time.time() - (t1 - t0), "end": time.time()})
            return {"rank": self.rank, "version": version, "seconds": t1 - t0,
                    "load_seconds": max(r["seconds"] for r in res), "recv_seconds": max(r["recv_s"] for r in res),
                    "apply_seconds": max(r["load_s"] for r in res), "bytes": res[0]["bytes"]}

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

    async def stats(self) -> dict[str, Any]:
        return {"rank": self.rank, "version": self.version, "inflight": self.inflight,
                "tokens_out": self.tokens_out, "samples_out": self.samples_out, "cached_tokens": self.cached_tokens}

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _token_versions(comp: Any, n: int, fallback: int) -> list[int]:
    """Per-token policy versions from vLLM's weight-version spans (or the start version without them)."""
    spans = getattr(comp, "weight_versions", None)
    if not spans:
        return [fallback] * n
    out = [fallback] * n
    for span in spans:
        if not str(span.version).lstrip("-").isdigit():
            continue  # a label streamrl did not set (e.g. vLLM's "default" before the first update)
        for k in range(span.start, min(span.end, n)):
            out[k] = int(span.version)
    return out


RolloutActor = ray.remote(num_cpus=1, max_concurrency=10_000)(RolloutWorker)


def stop_workers(workers: list[Any], timeout_s: float = 60.0) -> None:
    """Shut every engine down (best effort: a dead one is skipped) and kill its actor, so its GPU memory
    and processes are gone before the next engine starts (tests and benchmarks start several in a row)."""
    for w in workers:
        try:
            ray.get(w.shutdown.remote(), timeout=timeout_s)
        except Exception:
            pass
        ray.kill(w)
