"""Held-out evaluation while training goes on (the recipe's `eval` section).

An eval round sends a fixed set of prompts that training never sees straight to the rollout workers
(`RolloutWorker.evaluate_group`: generated beside the training rollouts, scored with the eval reward function
and returned, never written to the store), so training does not stop for it. Every sample carries the policy
versions its tokens ran on; a round that a weight update cut reports its lowest and highest version.

Rounds run at version 0 (`at_start`), every `eval.every` versions, and on the final weights (`at_end`); a
round still running when the next falls due makes that one skip (counted). With placement timeshare the
engines wait for a running round before they sleep for training (`Colocation`). A finished round's figures
go into the next step record (`eval/*`, so every sink gets them; the last step's record holds the final
round) and into `<run_dir>/eval/rounds.jsonl`, its samples into `<run_dir>/eval/step_<version>.jsonl`.

Held out: with a synthetic training task the eval prompts are `eval.prompts` distinct problems drawn with
`eval.seed`, which the training stream then never yields (`ArithmeticTask.hold_out`); a file source must
be another file than the training one, and its prompts that also appear in a training file are dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from rl.core.config import Recipe, RecipeError
from rl.core.waits import await_
from rl.data import PromptFormatter, PromptStream, read_prompt_file, row_to_json
from rollout.records import EvalSample, GroupRequest
from rollout.router import RolloutRouter

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
ROUNDS = "rounds.jsonl"  # one line of figures per round, in <run_dir>/eval


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one prompt with `c` solved samples out of `n`: the chance that k samples drawn
    without replacement hold at least one solved one, 1 - C(n - c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n = {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def round_metrics(samples: list[EvalSample], pass_k: list[int], threshold: float) -> dict[str, float]:
    """A round's eval/* figures from its scored samples."""
    by_prompt: dict[int, list[float]] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt_no, []).append(s.score)
    out = {"eval/reward_mean": sum(s.score for s in samples) / len(samples),
           "eval/version": min(s.version for s in samples),
           "eval/version_min": min(s.version for s in samples),
           "eval/version_max": max(s.version_max for s in samples),
           "eval/prompts": len(by_prompt), "eval/samples": len(samples)}
    for k in pass_k:
        out[f"eval/pass@{k}"] = sum(pass_at_k(len(v), sum(x >= threshold for x in v), k)
                                    for v in by_prompt.values()) / len(by_prompt)
    return out


def eval_rows(recipe: Recipe, stream: PromptStream) -> list[dict]:
    """The eval prompts' rows. A synthetic source holds its problems out of `stream`, the training prompts."""
    e = recipe.eval
    if not e.source or e.source == recipe.data.source:
        if stream.task is None:
            raise RecipeError("eval.source is empty but data.source is a file: set eval.source to a prompt file")
        return stream.task.hold_out(e.prompts, e.seed)
    if e.source.startswith("synthetic:"):
        raise RecipeError(f"eval.source = {e.source!r} differs from data.source = {recipe.data.source!r}: a synthetic "
                          f"eval task is the training one with problems held out; leave eval.source empty")
    rows = read_prompt_file(e.source, recipe.data.prompt_key)
    if stream.task is None:  # a training file: never evaluate on a prompt it holds
        seen = {r["prompt"] for r in read_prompt_file(recipe.data.source, recipe.data.prompt_key)}
        kept = [r for r in rows if r["prompt"] not in seen]
        if len(kept) < len(rows):
            log.warning("eval.source %s: %d of its %d prompts are also in data.source %s; evaluating on the other %d",
                        e.source, len(rows) - len(kept), len(rows), recipe.data.source, len(kept))
        rows = kept
    if not rows:
        raise RecipeError(f"eval.source = {e.source!r}: no prompt left that training does not also use")
    return rows[:e.prompts] if e.prompts else rows


class Evaluator:
    """Runs eval rounds on the rollout workers beside training; `take` hands the figures to the step record."""

    def __init__(self, recipe: Recipe, rows: list[dict], fmt: PromptFormatter, tokenizer: Any,
                 router: RolloutRouter, run_dir: Path, version: Callable[[], int]) -> None:
        self.cfg, self.total_steps = recipe.eval, recipe.trainer.total_steps
        self.reward = replace(recipe.reward, fn=recipe.eval.reward_fn or recipe.reward.fn)
        self.max_tokens = recipe.eval.max_tokens or recipe.rollout.max_tokens
        self.pass_k = list(recipe.eval.pass_k) or sorted({1, recipe.eval.samples_per_prompt})
        self.router, self.dir, self.version = router, Path(run_dir) / EVAL_DIR, version
        add_special = not recipe.data.chat_template
        self.requests = []
        for g, row in enumerate(rows):
            prompt = fmt(row)
            self.requests.append(GroupRequest(group=g, prompt=prompt, row=row_to_json(row),
                                              prompt_ids=tokenizer(prompt, add_special_tokens=add_special)["input_ids"],
                                              n=recipe.eval.samples_per_prompt))
        self.running: asyncio.Task | None = None
        self.finished: list[dict[str, float]] = []
        self.rounds = self.skipped = self.failed = 0

    @classmethod
    def from_recipe(cls, recipe: Recipe, stream: PromptStream, fmt: PromptFormatter, tokenizer: Any,
                    router: RolloutRouter, run_dir: Path, version: Callable[[], int]) -> "Evaluator | None":
        """The run's evaluator, or None when `eval.every` is 0 (then the training stream is untouched)."""
        if not recipe.eval.every:
            return None
        return cls(recipe, eval_rows(recipe, stream), fmt, tokenizer, router, run_dir, version)

    def start(self) -> None:
        """The round at version 0 (not on a resume: training has changed the weights)."""
        if self.cfg.at_start and self.version() == 0:
            self._launch(0)

    def on_version(self, version: int) -> None:
        """The engines now hold `version`: start a round if one is due."""
        if self.cfg.at_end and version == self.total_steps:
            previous = self.running
            self.running = asyncio.create_task(self._final(previous, version))
        elif version % self.cfg.every == 0:
            if self.busy():
                self.skipped += 1
                log.warning("eval round at version %d skipped: the round before it is still running (eval.every = "
                            "%d steps is shorter than a round)", version, self.cfg.every)
                return
            self._launch(version)

    async def take(self) -> dict[str, float]:
        """The oldest finished round not yet taken; after the final step the final round, awaited (a round that
        finished with it has its figures in eval/rounds.jsonl only: a step record holds one round)."""
        final = self.version() == self.total_steps and self.cfg.at_end
        if self.running is not None and final:
            await await_(asyncio.shield(self.running), 2 * self.cfg.timeout_s, f"the final eval round (version "
                         f"{self.total_steps}, {len(self.requests)} prompts)", "rollout workers")
        out = (self.finished[-1] if final else self.finished[0]) if self.finished else {}
        for m in self.finished[:-1] if final else []:
            log.info("eval round at version %d finished beside the final one: its figures are in %s only",
                     m["eval/launched_version"], self.dir / ROUNDS)
        self.finished = [] if final else self.finished[1:]
        if out or self.skipped or self.failed:
            out = {**out, "eval/skipped_rounds": self.skipped, "eval/failed_rounds": self.failed}
        return out

    def busy(self) -> bool:
        """A round is running (placement timeshare: the engines may not sleep until it ends)."""
        return self.running is not None and not self.running.done()

    def stop(self) -> None:
        if self.running is not None:
            self.running.cancel()

    # ------------------------------------------------------------------ one round
    def _launch(self, version: int) -> None:
        self.running = asyncio.create_task(self._round(version))

    async def _final(self, previous: asyncio.Task | None, version: int) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        await self._round(version)

    async def _round(self, launched: int) -> None:
        """One round; a failure is reported and counted, never stops training."""
        t0 = time.perf_counter()
        try:
            per_prompt = await asyncio.gather(*[self._prompt(req, launched) for req in self.requests])
        except Exception as exc:
            self.failed += 1
            log.warning("eval round at version %d failed (training goes on): %s: %s", launched, type(exc).__name__, exc)
            return
        samples = [s for group in per_prompt for s in group]
        m = round_metrics(samples, self.pass_k, self.cfg.pass_threshold)
        self.rounds += 1
        m.update({"eval/seconds": time.perf_counter() - t0, "eval/launched_version": launched,
                  "eval/round": self.rounds})
        self._dump(launched, samples, m)
        self.finished.append(m)
        log.info("eval round %d (version %d..%d): reward %.3f in %.1f s", self.rounds, m["eval/version_min"],
                 m["eval/version_max"], m["eval/reward_mean"], m["eval/seconds"])

    async def _prompt(self, req: GroupRequest, launched: int) -> list[EvalSample]:
        """One prompt's samples on the engine with the least outstanding work (counted like a training group)."""
        i = self.router.pick()
        cost = (len(req.prompt_ids) + self.max_tokens) * req.n
        self.router.outstanding[i] += cost
        try:
            return await await_(
                self.router.workers[i].evaluate_group.remote(req, self.cfg.temperature, self.max_tokens, self.reward),
                self.cfg.timeout_s, f"eval prompt {req.group} ({req.n} samples) of the round at version {launched}",
                f"rollout worker {i}", "raise eval.timeout_s, or lower eval.prompts")
        finally:
            self.router.outstanding[i] -= cost

    def _dump(self, launched: int, samples: list[EvalSample], figures: dict[str, float]) -> None:
        """The round's samples as JSON lines (pandas.read_json(path, lines=True) reads them), and its figures
        as a line of rounds.jsonl (every round, whichever step record it reached)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"step_{launched:06d}.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps({"round": self.rounds, "launched_version": launched, **asdict(s)}) + "\n")
        with open(self.dir / ROUNDS, "a") as f:
            f.write(json.dumps({"time": time.time(), **figures}) + "\n")
