import asyncio
import logging
import time
from pathlib import Path

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


# ---------------------------------------------------------------- built-ins, batched, class plugins
from rl.config import RewardConfig
from rl.rewards import extract_answer, make_reward_caller, math_answer


@pytest.mark.parametrize("response, truth, score", [
    ("... so she sold 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("The answer is \\boxed{0.50}", "\\frac{1}{2}", 1.0),
    ("It costs \\boxed{\\$1,000}", "1000", 1.0),
    ("I get 41 in the end", "#### 42", 0.0),
    ("no number here", "42", 0.0),
    ("\\boxed{x^2 + 1}", "\\boxed{x^2+1}", 1.0),
])
def test_math_answer(response, truth, score):
    assert math_answer(Sample("q", response, row={"answer": truth}))["score"] == score


def test_extract_answer_nested_boxed():
    assert extract_answer("a \\boxed{\\frac{\\sqrt{2}}{2}} b") == "\\frac{\\sqrt{2}}{2}"


def test_batched_function(tmp_path):
    f = tmp_path / "batch.py"
    f.write_text("def score(samples):\n    return [len(s.response) for s in samples]\n"
                 "def wrong(samples):\n    return [1.0]\n")
    caller = make_reward_caller(RewardConfig(fn=f"{f}:score", batched=True))
    out = asyncio.run(caller.score_many([Sample("p", "ab"), Sample("p", "abcd")]))
    assert [o.score for o in out] == [2.0, 4.0]
    caller = make_reward_caller(RewardConfig(fn=f"{f}:wrong", batched=True, error_score=-1.0))
    out = asyncio.run(caller.score_many([Sample("p", "ab"), Sample("p", "abcd")]))
    assert [o.score for o in out] == [-1.0, -1.0] and "expected a list of 2" in out[0].error


def test_reward_model_scorer(tmp_path, tiny_model):
    """A real (tiny, random) sequence-classification model built locally scores samples."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(tiny_model)
    cfg.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(cfg)
    rm.config.pad_token_id = 0
    rm.save_pretrained(tmp_path / "rm")
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_model) / name).exists():
            shutil.copy(Path(tiny_model) / name, tmp_path / "rm" / name)
    caller = make_reward_caller(RewardConfig(fn="rl.rewards:RewardModel", model_path=str(tmp_path / "rm"),
                                             model_sigmoid=True))
    a = asyncio.run(caller.score(Sample("1+1=", "2")))
    b = asyncio.run(caller.score(Sample("1+1=", "2")))
    c = asyncio.run(caller.score(Sample("1+1=", "17")))
    assert not a.error and 0.0 < a.score < 1.0 and a.score == b.score and c.score != a.score


def test_reward_model_without_path_is_a_clear_error():
    with pytest.raises(RewardLoadError, match="reward.model_path is empty"):
        make_reward_caller(RewardConfig(fn="rl.rewards:RewardModel"))
