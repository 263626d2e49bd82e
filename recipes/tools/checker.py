"""A checker tool for recipes/multiturn_tool.yaml: when the model's answer is wrong it says so and asks
again, so the model gets up to `rollout.agent.max_turns` tries (the checker's text is masked out of the
loss). Works with the tiny arithmetic model, which answers `a+b=` prompts but never writes tool calls;
calculator.py beside it is the call-a-tool pattern for a model that writes `calc(...)`, and its
`final_answer` (the text after the last "=") scores both."""

from __future__ import annotations

from rollout.agent import Conversation


def next_turn(conv: Conversation) -> str | None:
    """None (stop) after a right answer; otherwise ' no. <the question again>'."""
    if conv.last.strip() == str(conv.row.get("answer", "")).strip():
        return None
    return f" no. {conv.prompt}"

