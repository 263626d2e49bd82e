import asyncio
import logging
import math
import time

import pytest

from rl.rewards import RewardCaller, RewardLoadError, Sample, arithmetic_exact, load_reward_fn

S = Sample(prompt="2+3=", response="5", row={"answer": "5"}, index=7)


def run(caller, sample=S):
    return asyncio.run(caller.score(sample))


def test_builtin_arithmetic():
    assert arithmetic_exact(S) == 1.0
    assert arithmetic_exact(Sample("2+3=", " 6", row={"answer": "5"})) == 0.0


def test_load_module_function():
    assert load_reward_fn("rl.rewards:arithmetic_exact") is arithmetic_exact


def test_load_file_function(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def score(sample):\n    return {'score': len(sample.response) / 10, 'length': len(sample.response)}\n")
    fn = load_reward_fn(f"{f}:score")
    out = run(RewardCaller(fn, 5, 0.0))
    assert out.score == pytest.approx(0.1) and out.extras == {"length": 1.0} and not out.error


@pytest.mark.parametrize("spec, words", [
    ("no_colon", "module:function"),
    ("/nope/missing.py:f", "not found"),
    ("rl.rewards:nope", "no function 'nope'"),
    ("not_a_module_xyz:f", "cannot import"),
])
def test_load_errors_are_clear(spec, words):
    with pytest.raises(RewardLoadError, match=words):
        load_reward_fn(spec)


def test_file_that_fails_to_import(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardLoadError, match="boom at import"):
        load_reward_fn(f"{f}:score")


def _raises(sample):
    raise ValueError("bad ground truth")


def _wrong_type(sample):
    return "1.0"


def _nan(sample):
    return float("nan")


def _no_score(sample):
    return {"acc": 1.0}


def _sleeps(sample):
    time.sleep(2)
    return 1.0


@pytest.mark.parametrize("fn, words", [
    (_raises, "raised ValueError: bad ground truth"),
    (_wrong_type, "returned str"),
    (_nan, "non-finite"),
    (_no_score, "without 'score'"),
    (_sleeps, "timed out"),
])
def test_bad_functions_are_reported_and_scored_error_score(fn, words, caplog):
    caplog.set_level(logging.WARNING)
    out = run(RewardCaller(fn, timeout_s=0.5, error_score=-1.0))
    assert out.score == -1.0
    assert words in out.error
    assert words in caplog.text and "2+3=" in caplog.text  # the sample is named in the report


def test_async_function_and_timeout():
    async def good(sample):
        return 0.5

    async def slow(sample):
        await asyncio.sleep(5)
        return 1.0

    assert run(RewardCaller(good, 1, 0.0)).score == 0.5
    t0 = time.time()
    out = run(RewardCaller(slow, 0.3, 0.0))
    assert out.error.startswith("timed out") and time.time() - t0 < 2


def test_numpy_scalar_accepted():
    import numpy as np

    out = run(RewardCaller(lambda s: np.float32(0.25), 1, 0.0))
    assert out.score == 0.25 and not out.error
