"""Reward functions that misbehave on purpose, for the controller tests."""

import asyncio
import time

from rl.rewards import arithmetic_exact


def unreliable(sample):
    """Right answers score 1; but some prompts make it raise, return NaN, the wrong type, or hang."""
    a = int(sample.prompt.split("+")[0]) if "+" in sample.prompt else 0
    kind = a % 10
    if kind == 1:
        raise ValueError(f"cannot parse {sample.response!r}")
    if kind == 2:
        return float("nan")
    if kind == 3:
        return "1.0"
    if kind == 4 and sample.index % 4 == 0:
        time.sleep(3)  # past reward.timeout_s
    return float(sample.response.strip() == sample.row["answer"])


def equal_for_even(sample):
    """Groups of even first operands get the same reward for every sample (no signal); the others vary."""
    a = int(sample.prompt.split("+")[0])
    if a % 2 == 0:
        return 0.5
    return float(sample.index % 2)


async def slow_exact(sample):
    """Right answers score 1, half a second later: steps slow enough for a test to act between them."""
    await asyncio.sleep(0.5)
    return arithmetic_exact(sample)


def constant(sample):
    """The same reward for every sample: every group carries no signal (dynamic sampling gives up)."""
    return 0.5
