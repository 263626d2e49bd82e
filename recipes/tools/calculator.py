"""A toy calculator tool for recipes/multiturn_tool.yaml (the agent-loop hook and its reward)."""

from __future__ import annotations

import re

from rl.rewards import Sample
from rollout.agent import Conversation

CALL = re.compile(r"calc\(([0-9+\-* ]{1,32})\)")


def next_turn(conv: Conversation) -> str | None:
    """If the last model turn asked for calc(<expr>), answer '=<value>'; otherwise end the episode."""
    m = CALL.search(conv.last)
    if not m:
        return None
    try:
        value = eval(m.group(1), {"__builtins__": {}}, {})  # digits and + - * only (the regex)
    except SyntaxError:
        return "=error"
    return f"={value}"


def final_answer(sample: Sample) -> float:
    """1.0 when the text after the last tool result (or the whole response) is the right answer."""
    tail = sample.response.rsplit("=", 1)[-1] if "=" in sample.response else sample.response
    return float(tail.strip() == str(sample.row.get("answer", "")).strip())
