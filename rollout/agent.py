"""Episodes: one sample's life in the engine, single-turn or multi-turn with a user hook (tools, users).

The hook is one plain function (sync or async) named by `rollout.agent.fn`:

    def next_turn(conv: Conversation) -> str | None

It is called after every model turn with the conversation so far and returns the text of the next
tool/user turn, or None to end the episode. Its text is tokenized and appended to the context; those
tokens are part of the response but masked out of the loss (`loss_mask` 0), and their logprob is 0.
A hook that raises or passes its timeout ends the episode there (reported, never fatal).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from rl.core.config import AgentConfig

log = logging.getLogger(__name__)


@dataclass
class Turn:
    role: str  # "assistant" (generated) or "tool" (returned by the hook)
    text: str


@dataclass
class Conversation:
    """What the hook sees: the prompt, the dataset row, and the turns so far (the last is the model's)."""

    prompt: str
    row: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)

    @property
    def last(self) -> str:
        return self.turns[-1].text if self.turns else ""


@dataclass
class TurnOutput:
    ids: list[int]
    logprobs: list[float]
    versions: list[int]
    text: str
    finish_reason: str


@dataclass
class Episode:
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_versions: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    turns: int = 0
    hook_error: str = ""


Generate = Callable[[list[int], int], Awaitable[TurnOutput]]
Tokenize = Callable[[str], list[int]]


async def run_episode(generate: Generate, prompt: str, prompt_ids: list[int], row: dict[str, Any],
                      max_tokens: int, cfg: AgentConfig, hook: Callable | None, tokenize: Tokenize,
                      version: Callable[[], int], max_context: int) -> Episode:
    """Generate turns until the hook stops, the turn limit, or the token budget; see module docstring."""
    ep = Episode()
    turns = cfg.max_turns if hook is not None else 1
    budget = min(cfg.max_total_tokens or max_tokens * turns, max_context - len(prompt_ids))
    conv = Conversation(prompt, row)
    for turn in range(turns):
        room = min(max_tokens, budget - len(ep.response_ids))
        if room <= 0:
            break
        out = await generate(list(prompt_ids) + ep.response_ids, room)
        ep.response_ids += out.ids
        ep.logprobs += out.logprobs
        ep.token_versions += out.versions
        ep.loss_mask += [1] * len(out.ids)
        ep.text += out.text
        ep.finish_reason = out.finish_reason
        ep.turns += 1
        conv.turns.append(Turn("assistant", out.text))
        if hook is None or turn == turns - 1 or out.finish_reason == "length" and len(ep.response_ids) >= budget:
            break  # no model turn could answer the hook's text
        nxt = await _call_hook(hook, conv, cfg.timeout_s, ep)
        if not nxt:
            break
        ids = tokenize(nxt)[: max(0, budget - len(ep.response_ids))]
        if not ids:
            break
        ep.response_ids += ids
        ep.logprobs += [0.0] * len(ids)
        ep.token_versions += [version()] * len(ids)
        ep.loss_mask += [0] * len(ids)
        ep.text += nxt
        conv.turns.append(Turn("tool", nxt))
    return ep


async def _call_hook(hook: Callable, conv: Conversation, timeout_s: float, ep: Episode) -> str | None:
    try:
        if inspect.iscoroutinefunction(hook):
            out = await asyncio.wait_for(hook(conv), timeout_s)
        else:
            out = await asyncio.wait_for(asyncio.to_thread(hook, conv), timeout_s)
    except asyncio.TimeoutError:
        ep.hook_error = f"agent hook timed out after {timeout_s} s"
    except Exception as exc:  # the user's code: reported, ends this episode only
        ep.hook_error = f"agent hook raised {type(exc).__name__}: {exc}"
    else:
        if out is None or isinstance(out, str):
            return out
        ep.hook_error = f"agent hook returned {type(out).__name__}; expected str or None"
    log.warning("%s (prompt=%r, last turn=%r); episode ends here", ep.hook_error, conv.prompt[:200], conv.last[:200])
    return None
