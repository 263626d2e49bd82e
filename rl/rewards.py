"""Reward functions: the user's plug-in point, how it is loaded, and how a call is made safe.

A reward function takes one `Sample` and returns a float, or a dict with a float `score` and any other
named numbers (they become metrics). It may be `async def`. With `reward.batched` it takes a list of
samples and returns a list. It is named in the recipe as `module:function` or
`path/to/file.py:function`; a class there is constructed once with the reward config (see RewardModel).

Built-ins: `arithmetic_exact` (the synthetic task), `math_answer` (GSM8K '####' and \\boxed{} answers,
normalised, numeric comparison), `RewardModel` (a sequence-classification model's score).

A call that raises, hangs past its timeout, or returns something that is not a finite score is reported
with the sample and scored `error_score`; the run goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import re
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
    """Calls the user's function safely: sync functions in a thread pool, async ones on the loop; with
    `batched`, the function takes a list of samples and returns a list of scores."""

    def __init__(self, fn: Any, timeout_s: float, error_score: float, batched: bool = False,
                 max_threads: int = 8) -> None:
        self.fn, self.timeout_s, self.error_score, self.batched = fn, timeout_s, error_score, batched
        target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)
        self.is_async = inspect.iscoroutinefunction(target)
        self.name = getattr(fn, "__qualname__", type(fn).__name__)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_threads, thread_name_prefix="reward")

    async def _call(self, arg: Any) -> Any:
        if self.is_async:
            return await asyncio.wait_for(self.fn(arg), self.timeout_s)
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(self.pool, self.fn, arg), self.timeout_s)

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
    if inspect.isclass(obj):
        try:
            obj = obj(cfg)
        except Exception as exc:
            raise PluginLoadError(f"reward.fn = {cfg.fn!r}: constructing {obj.__name__}(reward config) failed: {exc!r}") from exc
    return RewardCaller(obj, cfg.timeout_s, cfg.error_score, batched=cfg.batched)


# ------------------------------------------------------------------------ built-in reward functions

def arithmetic_exact(sample: Sample) -> float:
    """1.0 when the response (stripped) equals the row's `answer`, else 0.0."""
    return float(sample.response.strip() == str(sample.row.get("answer", "")).strip())


_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """A math response's final answer: the last \\boxed{}, else what follows the last '####', else the
    last number in the text."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().splitlines()[0] if text.rsplit("####", 1)[1].strip() else None
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def normalize_answer(ans: str) -> str:
    """Strip what does not change a math answer: $, commas in numbers, \\text{}, spaces, a final period,
    \\left/\\right, and trailing zeros of decimals."""
    s = ans.replace("\\$", "").replace("\\%", "").replace("%", "").strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = s.rstrip(".").replace(" ", "").lower()
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def _as_number(s: str) -> float | None:
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(\d+)", s)
    if m:
        return float(m.group(1)) / float(m.group(2))
    m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", s)
    if m:
        return float(m.group(1)) / float(m.group(2))
    try:
        return float(s)
    except ValueError:
        return None


def math_answer(sample: Sample) -> dict[str, float]:
    """1.0 when the response's final answer equals the ground truth (GSM8K '#### x' or \\boxed{} forms,
    numerically when both are numbers). Ground truth: the row's `answer` (its part after '####' if any).
    Also reports `has_answer`: whether any final answer could be read from the response."""
    truth_raw = str(sample.row.get("answer", ""))
    truth = extract_answer(truth_raw) if ("####" in truth_raw or _BOXED in truth_raw) else truth_raw
    got = extract_answer(sample.response)
    if got is None or truth is None:
        return {"score": 0.0, "has_answer": float(got is not None)}
    a, b = normalize_answer(got), normalize_answer(truth)
    na, nb = _as_number(a), _as_number(b)
    same = abs(na - nb) <= 1e-6 * max(1.0, abs(nb)) if na is not None and nb is not None else a == b
    return {"score": float(same), "has_answer": 1.0}


class RewardModel:
    """Scores `prompt + response` with a Hugging Face sequence-classification model (`reward.model_path`);
    the score is the first logit, or its sigmoid when `reward.model_sigmoid`. Name it as
    `reward.fn=rl.rewards:RewardModel`; each reward worker loads the model once."""

    def __init__(self, cfg: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not cfg.model_path:
            raise ValueError("reward.model_path is empty: point it at a sequence-classification model directory")
        self.tok = AutoTokenizer.from_pretrained(cfg.model_path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.model_path).eval()
        self.sigmoid = cfg.model_sigmoid
        self.lock = __import__("threading").Lock()
        torch.set_num_threads(1)

    def __call__(self, samples: list[Sample] | Sample) -> list[float] | float:
        import torch

        batch = samples if isinstance(samples, list) else [samples]
        enc = self.tok([s.prompt + s.response for s in batch], return_tensors="pt", padding=True, truncation=True)
        with self.lock, torch.no_grad():
            logits = self.model(**enc).logits[:, 0].float()
        scores = (torch.sigmoid(logits) if self.sigmoid else logits).tolist()
        return scores if isinstance(samples, list) else scores[0]
