"""How a reward function is loaded and called, and what its scores add up to: the machinery under the
reward workers and the rollout workers that score inline (`reward.inline`).

A reward function takes one `Sample` and returns a float, or a dict with a float `score` and any other
named numbers (they become metrics). It may be `async def`. With `reward.batched` it takes a list of
samples and returns a list. A call that raises, hangs past its timeout, or returns something that is not a
finite score is reported with the sample and scored `error_score`; the run goes on. The built-in functions
are in `rl.rewards`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from rl.core.plugins import PluginLoadError, load_function

log = logging.getLogger(__name__)

#: the columns a scorer writes for every sample (the store's schema for them)
WRITE_FIELDS = ["reward", "reward_info"]

RewardFn = Callable[["Sample"], Union[float, dict, Awaitable[Union[float, dict]]]]


@dataclass
class Sample:
    """What a reward function sees of one generated sample."""

    prompt: str
    response: str
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)  # the dataset row's other fields (e.g. ground truth)
    index: int = -1
    finish_reason: str = ""


@dataclass
class Scored:
    score: float
    extras: dict[str, float] = field(default_factory=dict)
    error: str = ""


RewardLoadError = PluginLoadError


def load_reward_fn(spec: str) -> RewardFn:
    """Import `module:function` or `path/to/file.py:function`; errors say which part failed."""
    return load_function(spec, "reward.fn")


def _coerce(value: Any) -> Scored:
    """A float, int, bool or {'score': float, ...} becomes Scored; anything else is an error."""
    extras: dict[str, float] = {}
    if isinstance(value, dict):
        if "score" not in value:
            return Scored(math.nan, error=f"returned a dict without 'score' (keys: {sorted(value)})")
        extras = {k: float(v) for k, v in value.items() if k != "score" and isinstance(v, (int, float))}
        value = value["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
            value = value.item()
        else:
            return Scored(math.nan, error=f"returned {type(value).__name__} {value!r:.80}; expected a float or a dict with 'score'")
    value = float(value)
    if not math.isfinite(value):
        return Scored(math.nan, error=f"returned a non-finite score {value}")
    return Scored(value, extras)


class CallFailed(Exception):
    """The function raised in a reward process; the message says what."""


class RewardCaller:
    """Calls the user's function safely: async ones on the loop; sync ones in a thread pool, or with
    `procs` (reward.isolation=process) in processes that a hung call's timeout kills and replaces; with
    `batched`, the function takes a list of samples and returns a list of scores. `abandoned` counts calls
    given up at their timeout: in a thread such a call keeps running (its thread is lost to the pool; when
    every thread hangs the pool is replaced so scoring goes on), in a process it is killed."""

    def __init__(self, fn: Any, timeout_s: float, error_score: float, batched: bool = False,
                 max_threads: int = 8, procs: Any = None) -> None:
        self.fn, self.timeout_s, self.error_score, self.batched = fn, timeout_s, error_score, batched
        target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
        self.is_async = inspect.iscoroutinefunction(target)
        self.name = getattr(fn, "__qualname__", type(fn).__name__)
        self.max_threads, self.procs = max_threads, None if self.is_async else procs
        self.pool = concurrent.futures.ThreadPoolExecutor(max_threads, thread_name_prefix="reward")
        self.hung: set[asyncio.Future] = set()  # thread calls past their timeout, still running
        self.abandoned = 0

    async def _call(self, arg: Any) -> Any:
        if self.is_async:
            return await asyncio.wait_for(self.fn(arg), self.timeout_s)
        if self.procs is not None:
            try:
                return await self.procs.call(arg, self.timeout_s)
            except TimeoutError:
                self.abandoned += 1  # its process was killed and replaced
                raise asyncio.TimeoutError from None
            except RuntimeError as exc:
                raise CallFailed(str(exc)) from None
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self.fn, arg)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except asyncio.TimeoutError:
            self._abandon(fut)
            raise

    def _abandon(self, fut: asyncio.Future) -> None:
        self.abandoned += 1
        self.hung = {f for f in self.hung if not f.done()} | {fut}
        if len(self.hung) >= self.max_threads:  # every thread holds a hung call: later calls get fresh ones
            log.warning("reward function %s: all %d threads hold calls that timed out and still run; starting a "
                        "new pool (reward.isolation=process kills such calls instead)", self.name, self.max_threads)
            self.pool.shutdown(wait=False)
            self.pool = concurrent.futures.ThreadPoolExecutor(self.max_threads, thread_name_prefix="reward")
            self.hung = set()

    async def score(self, sample: Sample) -> Scored:
        return (await self.score_many([sample]))[0]

    async def score_many(self, samples: list[Sample]) -> list[Scored]:
        """Scores for `samples`: one call per sample, or one call for all when batched."""
        if not self.batched:
            return list(await asyncio.gather(*[self._one(s) for s in samples]))
        try:
            raw = await self._call(samples)
            if not isinstance(raw, (list, tuple)) or len(raw) != len(samples):
                got = f"{type(raw).__name__} of length {len(raw)}" if isinstance(raw, (list, tuple)) else type(raw).__name__
                results = [Scored(math.nan, error=f"batched call returned {got}; expected a list of {len(samples)}")] * len(samples)
            else:
                results = [_coerce(r) for r in raw]
        except asyncio.TimeoutError:
            results = [Scored(math.nan, error=f"batched call timed out after {self.timeout_s} s")] * len(samples)
        except Exception as exc:  # the user's code: any exception is reported, never fatal
            results = [Scored(math.nan, error=f"batched call raised {type(exc).__name__}: {exc}")] * len(samples)
        return [self._report(s, Scored(r.score, dict(r.extras), r.error)) for s, r in zip(samples, results)]

    async def _one(self, sample: Sample) -> Scored:
        try:
            result = _coerce(await self._call(sample))
        except asyncio.TimeoutError:
            result = Scored(math.nan, error=f"timed out after {self.timeout_s} s")
        except CallFailed as exc:
            result = Scored(math.nan, error=str(exc))
        except Exception as exc:  # the user's code: any exception is reported, never fatal
            result = Scored(math.nan, error=f"raised {type(exc).__name__}: {exc}")
        return self._report(sample, result)

    def _report(self, sample: Sample, result: Scored) -> Scored:
        if result.error:
            log.warning("reward function %s %s on sample %d (prompt=%r, response=%r); scored %s", self.name,
                        result.error, sample.index, sample.prompt[:200], sample.response[:200], self.error_score)
            result.score = self.error_score
        return result


def make_reward_caller(cfg: Any) -> RewardCaller:
    """The caller for `reward.fn`: a function, or a class instantiated once with the RewardConfig (for
    scorers that load something, like a reward model)."""
    obj = load_reward_fn(cfg.fn)
    isolation = getattr(cfg, "isolation", "thread")
    if isolation == "process":  # each process loads (and constructs) it; the caller here only calls
        from rl.core.reward_procs import RewardProcesses

        procs = RewardProcesses(cfg.fn, cfg, cfg.processes)
        return RewardCaller(obj, cfg.timeout_s, cfg.error_score, batched=cfg.batched, procs=procs)
    if inspect.isclass(obj):
        try:
            obj = obj(cfg)
        except Exception as exc:
            raise PluginLoadError(f"reward.fn = {cfg.fn!r}: constructing {obj.__name__}(reward config) failed: {exc!r}") from exc
    return RewardCaller(obj, cfg.timeout_s, cfg.error_score, batched=cfg.batched)


@dataclass
class RewardStats:
    """What a scorer's samples added up to since its start (a reward worker's `stats()`, or a rollout worker's
    `RolloutStats.reward` with `reward.inline`); the controller differences them per step."""

    scored: int = 0
    errors: int = 0
    score_sum: float = 0.0
    extras: dict[str, list[float]] = field(default_factory=dict)  # name -> [sum, count]
    recent_errors: list[dict[str, Any]] = field(default_factory=list)  # the last 20: index, prompt, response, error
    busy_s: float = 0.0  # a reward worker's seconds spent scoring
    abandoned: int = 0  # calls given up at their timeout (RewardCaller.abandoned)


class RewardTally:
    """What the scored samples add up to (the `reward/*` metrics): kept by a reward worker, or by a rollout
    worker that scores inline (`reward.inline`)."""

    def __init__(self) -> None:
        self.scored = 0
        self.errors = 0
        self.score_sum = 0.0
        self.extras: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name -> [sum, count]
        self.recent_errors: list[dict[str, Any]] = []

    def add(self, samples: list[Sample], results: list[Scored]) -> dict[str, list[Any]]:
        """Count the results; returns the columns to store (`WRITE_FIELDS`)."""
        self.scored += len(results)
        self.errors += sum(1 for s in results if s.error)
        self.score_sum += sum(float(s.score) for s in results)
        for sample, s in zip(samples, results):
            for k, v in s.extras.items():
                self.extras[k][0] += v
                self.extras[k][1] += 1
            if s.error:
                self.recent_errors = (self.recent_errors + [{"index": sample.index, "prompt": sample.prompt[:200],
                                                             "response": sample.response[:200], "error": s.error}])[-20:]
        return {"reward": [float(s.score) for s in results],
                "reward_info": [json.dumps({"error": s.error, **s.extras}) if (s.error or s.extras) else "" for s in results]}

    def stats(self) -> RewardStats:
        return RewardStats(self.scored, self.errors, self.score_sum, {k: list(v) for k, v in self.extras.items()},
                           list(self.recent_errors))
