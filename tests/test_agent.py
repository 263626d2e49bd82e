"""The episode loop of rollout.agent with a scripted engine below it (the loop is the unit here; the real
engine's multi-turn path is tests/test_rollout.py), and the multiturn recipe's checker tool."""

import asyncio
import os
import sys

from rl.core.config import AgentConfig
from rl.rewards import Sample
from rollout.agent import Conversation, TurnOutput, run_episode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes", "tools"))
import calculator  # noqa: E402
import checker  # noqa: E402


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def scripted(answers: list[str]):
    """An engine that answers each turn with the next scripted text (one token a character)."""
    calls = []

    async def generate(context: list[int], room: int) -> TurnOutput:
        calls.append(list(context))
        text = answers[len(calls) - 1][:room]
        return TurnOutput(tokenize(text), [-0.5] * len(text), [3] * len(text), text, "stop")

    return generate, calls


def episode(answers, hook, max_turns=3, max_tokens=8):
    generate, calls = scripted(answers)
    cfg = AgentConfig(fn="x", max_turns=max_turns, timeout_s=5)
    prompt = "13+5="
    ep = asyncio.run(run_episode(generate, prompt, tokenize(prompt), {"answer": "18"}, max_tokens, cfg, hook,
                                 tokenize, lambda: 3, max_context=200))
    return ep, calls


def test_tool_turns_are_masked_and_the_next_turn_sees_them():
    ep, calls = episode(["17", "18"], checker.next_turn)
    assert ep.turns == 2 and ep.text == "17 no. 13+5=18"
    tool = " no. 13+5="
    assert ep.loss_mask == [1, 1] + [0] * len(tool) + [1, 1]
    assert ep.logprobs[2:2 + len(tool)] == [0.0] * len(tool)
    assert calls[1] == tokenize("13+5=17 no. 13+5=")  # the second turn is generated after the tool's text


def test_the_hook_is_not_called_after_the_last_turn():
    seen = []

    def hook(conv: Conversation):
        seen.append(conv.last)
        return " again"

    ep, calls = episode(["1", "2", "3"], hook, max_turns=3)
    assert ep.turns == 3 and len(calls) == 3
    assert seen == ["1", "2"]  # nothing could answer a tool turn after the third model turn
    assert ep.text == "1 again2 again3" and ep.loss_mask[-1] == 1


def test_a_hook_that_raises_ends_the_episode_with_the_error():
    def hook(conv):
        raise ValueError("tool down")

    ep, calls = episode(["17", "18"], hook)
    assert ep.turns == 1 and len(calls) == 1
    assert "ValueError: tool down" in ep.hook_error


def test_checker_stops_on_the_right_answer_and_scores_the_last_one():
    conv = Conversation("13+5=", {"answer": "18"})
    conv.turns.append(type("T", (), {"text": "18"})())
    assert checker.next_turn(conv) is None
    sample = lambda text: Sample(prompt="13+5=", response=text, prompt_ids=[], response_ids=[],  # noqa: E731
                                 finish_reason="stop", row={"answer": "18"})
    assert calculator.final_answer(sample("17 no. 13+5=18")) == 1.0
    assert calculator.final_answer(sample("17 no. 13+5=19")) == 0.0
    assert calculator.final_answer(sample("18")) == 1.0
