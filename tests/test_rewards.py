import asyncio
import logging
import time
from pathlib import Path

import pytest

from rl.core.scoring import RewardCaller, RewardLoadError, Sample, load_reward_fn
from rl.rewards import arithmetic_exact

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
from rl.core.config import RewardConfig
from rl.core.scoring import make_reward_caller
from rl.rewards import MathAnswer, answers_match, extract_answer, math_answer


def score(response, truth, mode="strict"):
    return math_answer(Sample("q", response, row={"answer": truth}), mode)["score"]


@pytest.mark.parametrize("response, truth, expected", [
    ("... so she sold 72 clips.\n#### 72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("The answer is \\boxed{0.50}", "\\frac{1}{2}", 1.0),
    ("It costs \\boxed{\\$1,000}", "1000", 1.0),
    ("I get 41 in the end", "#### 42", 0.0),
    ("no number here", "42", 0.0),
    ("\\boxed{x^2 + 1}", "\\boxed{x^2+1}", 1.0),
])
def test_math_answer(response, truth, expected):
    assert score(response, truth) == expected


@pytest.mark.parametrize("response, truth", [
    ("#### 1000001", "1000000"),  # a relative tolerance of 1e-6 used to call these equal
    ("#### 5,000,003", "5000000"),
    ("#### 1000000.5", "1000000"),  # a decimal's tolerance is 1e-9 relative, not 1e-6
    ("#### 0.333", "\\frac{1}{3}"),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}"),
    ("\\boxed{5,002}", "5000"),
])
def test_numbers_that_differ_do_not_match(response, truth):
    assert score(response, truth) == 0.0


@pytest.mark.parametrize("got, truth", [
    ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("\\frac12", "\\frac{1}{2}"), ("\\frac1{x}", "\\frac{1}{x}"), ("\\frac{\\sqrt3}2", "\\frac{\\sqrt{3}}{2}"),
    ("\\sqrt2", "\\sqrt{2}"), ("2\\sqrt 3", "2\\sqrt{3}"),
    ("x = 3", "3"), ("y=\\frac{1}{2}", "0.5"),
    ("5\\text{ cm}", "5"), ("12\\text{ inches}^2", "12"), ("\\text{Monday}", "monday"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"),
    ("1{,}000", "1000"), ("1,000,000", "1000000"), ("1\\,000", "1000"),
    ("-\\frac{1}{2}", "-0.5"), ("\\frac{-1}{2}", "-0.5"), ("-1/2", "-\\dfrac12"),
    ("\\left( 3, \\frac{1}{2} \\right)", "(3,\\frac12)"),
    ("50\\%", "50"), ("\\$18.90", "18.9"), ("0.3333333333", "\\frac{1}{3}"),
])
def test_math_normalisation_matches(got, truth):
    assert answers_match(got, truth)


def test_exact_numbers_are_compared_exactly():
    assert not answers_match("1000001", "1000000") and not answers_match("\\frac{1}{3}", "\\frac{333333}{1000000}")
    assert answers_match("\\frac{2}{4}", "\\frac{1}{2}") and answers_match("7", "7.0")
    assert not answers_match("\\frac{1}{0}", "\\frac{2}{0}")  # a zero denominator: compared as strings


@pytest.mark.parametrize("response, strict, flexible", [
    ("#### 72", 1.0, 1.0),
    ("#### 72 clips", 1.0, 1.0),  # the number ends at whitespace
    ("so 70 + 2\n#### 72\n", 1.0, 1.0),
    ("#### 7,2", 0.0, 0.0),
    ("####72", 0.0, 1.0),  # strict: '#### ' needs its space (verl's GSM8K rule)
    ("#### 72.", 0.0, 1.0),  # strict: nothing but whitespace may follow the number
    ("#### $72", 0.0, 1.0),  # strict: a number right after '#### '
    ("the answer is 72", 0.0, 1.0),  # strict: an unmarked response has no answer
    ("#### 70 ... no wait, \\boxed{72}", 1.0, 1.0),  # the later marked answer counts
    ("\\boxed{70} ... no wait\n#### 72", 1.0, 1.0),
    ("#### 72 then #### 71", 0.0, 0.0),  # the last '####' answer
])
def test_strict_and_flexible_modes(response, strict, flexible):
    assert score(response, "#### 72", "strict") == strict
    assert score(response, "#### 72", "flexible") == flexible


@pytest.mark.parametrize("response, truth", [
    ("#### \\frac{1}{2}", "0.5"), ("####   2x + 1", "2x+1"), ("#### 3/4.", "0.75"), ("#### -5, so", "-5"),
])
def test_flexible_hash_reads_the_rest_of_the_line(response, truth):
    assert score(response, truth, "flexible") == 1.0


def test_has_answer_follows_the_mode():
    sample = Sample("q", "I think it is 72", row={"answer": "72"})
    assert math_answer(sample)["has_answer"] == 0.0
    assert math_answer(sample, "flexible")["has_answer"] == 1.0
    with pytest.raises(ValueError, match="strict, flexible"):
        extract_answer("#### 1", "lenient")


def test_extract_answer_nested_boxed():
    assert extract_answer("a \\boxed{\\frac{\\sqrt{2}}{2}} b") == "\\frac{\\sqrt{2}}{2}"


def test_math_answer_class_reads_the_recipe_mode():
    caller = make_reward_caller(RewardConfig(fn="rl.rewards:MathAnswer", answer_mode="flexible"))
    assert run(caller, Sample("q", "#### 72.", row={"answer": "#### 72"})).score == 1.0
    caller = make_reward_caller(RewardConfig(fn="rl.rewards:MathAnswer"))  # default: strict
    assert run(caller, Sample("q", "#### 72.", row={"answer": "#### 72"})).score == 0.0
    with pytest.raises(ValueError, match="answer_mode"):
        MathAnswer(RewardConfig(answer_mode="loose"))


def test_answer_mode_is_validated():
    from rl.core.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="reward.answer_mode.*strict, flexible"):
        load_recipe(None, ["reward.answer_mode=loose"])
    with pytest.raises(RecipeError, match="rl.rewards:MathAnswer"):
        load_recipe(None, ["reward.fn=rl.rewards:math_answer", "reward.answer_mode=flexible"])
    assert load_recipe(None, ["reward.fn=rl.rewards:MathAnswer", "reward.answer_mode=flexible"]).reward.answer_mode == "flexible"


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


# ------------------------------------------------------------------ hung calls: abandoned, never a lost worker
HANGING = """
import os, time

def score(sample):
    if sample.index < {hang}:
        time.sleep(3600)
    if sample.index == 99:
        raise ValueError("bad sample")
    if sample.index == 98:
        os._exit(3)
    return {{"score": 1.0, "pid": float(os.getpid())}}
"""


def test_process_isolation_kills_hung_calls_and_keeps_scoring(tmp_path):
    """reward.isolation=process: 3 hung calls time out, their processes are killed and replaced (2 live
    processes at the end, none left hanging), later samples score; a raise and an exit are one-line errors."""
    (tmp_path / "hang.py").write_text(HANGING.format(hang=3))
    cfg = RewardConfig(fn=f"{tmp_path / 'hang.py'}:score", timeout_s=1.0, isolation="process", processes=2)
    caller = make_reward_caller(cfg)

    async def main():
        hung = await caller.score_many([Sample("p", "r", index=i) for i in range(3)])
        fine = await caller.score_many([Sample("p", "r", index=i) for i in range(10, 16)])
        bad = await caller.score_many([Sample("p", "r", index=99), Sample("p", "r", index=98)])
        after = await caller.score(Sample("p", "r", index=20))
        return hung, fine, bad, after

    t0 = time.monotonic()
    hung, fine, bad, after = asyncio.run(main())
    procs = caller.procs
    try:
        assert all(r.score == cfg.error_score and "timed out after 1.0 s" in r.error for r in hung)
        assert all(r.score == 1.0 and not r.error for r in fine) and after.score == 1.0
        assert bad[0].error == "raised ValueError: bad sample" and "process ended during the call" in bad[1].error
        assert caller.abandoned == 3 and time.monotonic() - t0 < 60
        live = list(procs.idle._queue)
        assert len(live) == 2 and all(p.proc.is_alive() for p in live)
        assert int(after.extras["pid"]) in {p.proc.pid for p in live}  # a replacement scored it
    finally:
        procs.close()


def test_thread_isolation_counts_abandoned_calls_and_replaces_a_hung_pool(tmp_path):
    """reward.isolation=thread: every thread holding a hung call no longer stops scoring (a fresh pool);
    the abandoned calls are counted."""
    import threading

    release = threading.Event()

    def score(sample):
        if sample.index < 2:
            release.wait(60)  # hangs until the test ends (a pool thread cannot be killed)
        return 1.0

    caller = RewardCaller(score, timeout_s=0.5, error_score=0.0, max_threads=2)

    async def main():
        hung = await caller.score_many([Sample("p", "r", index=i) for i in range(2)])
        fine = await caller.score_many([Sample("p", "r", index=i) for i in range(10, 14)])
        return hung, fine

    try:
        hung, fine = asyncio.run(main())
    finally:
        release.set()
    assert all("timed out" in r.error for r in hung) and caller.abandoned == 2
    assert all(r.score == 1.0 and not r.error for r in fine)  # before the fresh pool these timed out too
