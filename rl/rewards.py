"""Reward functions: the user's plug-in point, how it is loaded, and how a call is made safe.

A reward function takes one `Sample` and returns a float, or a dict with a float `score` and any other
named numbers (they become metrics). It may be `async def`. It is named in the recipe as
`module:function` or `path/to/file.py:function`.

A call that raises, hangs past its timeout, or returns something that is not a finite score is reported
with the sample and scored `error_score`; the run goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from rl.plugins import PluginLoadError, load_function

log = logging.getLogger(__name__)

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


class RewardCaller:
    """Calls one user function safely: sync functions in a thread pool, async ones on the loop."""

    def __init__(self, fn: RewardFn, timeout_s: float, error_score: float, max_threads: int = 8) -> None:
        self.fn, self.timeout_s, self.error_score = fn, timeout_s, error_score
        self.is_async = inspect.iscoroutinefunction(fn)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_threads, thread_name_prefix="reward")

    async def score(self, sample: Sample) -> Scored:
        try:
            if self.is_async:
                raw = await asyncio.wait_for(self.fn(sample), self.timeout_s)
            else:
                loop = asyncio.get_running_loop()
                raw = await asyncio.wait_for(loop.run_in_executor(self.pool, self.fn, sample), self.timeout_s)
            result = _coerce(raw)
        except asyncio.TimeoutError:
            result = Scored(math.nan, error=f"timed out after {self.timeout_s} s")
        except Exception as exc:  # the user's code: any exception is reported, never fatal
            result = Scored(math.nan, error=f"raised {type(exc).__name__}: {exc}")
        if result.error:
            name = getattr(self.fn, "__qualname__", repr(self.fn))
            log.warning("reward function %s %s on sample %d (prompt=%r, response=%r); scored %s",
                        name, result.error, sample.index, sample.prompt[:200], sample.response[:200], self.error_score)
            result.score = self.error_score
        return result


# ------------------------------------------------------------------------ built-in reward functions

def arithmetic_exact(sample: Sample) -> float:
    """1.0 when the response (stripped) equals the row's `answer`, else 0.0."""
    return float(sample.response.strip() == str(sample.row.get("answer", "")).strip())


def row_json(sample_row: str) -> dict[str, Any]:
    return json.loads(sample_row) if sample_row else {}
