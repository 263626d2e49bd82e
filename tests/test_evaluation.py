"""Held-out evaluation (rl/evaluation.py): pass@k, the held-out rule, the recipe's eval keys, the summary; and one
short async run on the real stack with eval rounds at version 0, in the middle and on the final weights."""

import json
import math
from pathlib import Path

import pytest

from datastore.log import read_rows
from rl.core.config import RecipeError, load_recipe
from rl.data import PromptStream
from rl.evaluation import Evaluator, eval_rows, pass_at_k, round_metrics
from rl.metrics import learning_summary, read_metrics
from rl.dashboard.labels import metric_label
from rollout.records import EvalSample


# ---------------------------------------------------------------- pass@k and a round's figures
def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 4, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def sample(prompt_no, score, version=0, version_max=None):
    return EvalSample(prompt_no=prompt_no, sample=0, prompt="p", response="r", score=score, reward_info="", row="{}",
                      finish_reason="stop", version=version, version_max=version if version_max is None else version_max,
                      tokens=1, worker=0)


def test_round_metrics_on_hand_made_scores():
    samples = [sample(0, 1.0, 3), sample(0, 0.0, 3), sample(0, 0.0, 3), sample(0, 0.5, 3),  # 0.5 < threshold 1
               sample(1, 1.0, 4, 5), sample(1, 1.0, 4), sample(1, 0.0, 4), sample(1, 0.0, 4)]
    m = round_metrics(samples, [1, 2, 4], threshold=1.0)
    assert m["eval/reward_mean"] == pytest.approx(3.5 / 8)
    assert m["eval/pass@1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert m["eval/pass@2"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    assert m["eval/pass@4"] == 1.0
    assert (m["eval/version"], m["eval/version_min"], m["eval/version_max"]) == (3, 3, 5)
    assert (m["eval/prompts"], m["eval/samples"]) == (2, 8)
    assert round_metrics(samples, [1], threshold=0.5)["eval/pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)


# ---------------------------------------------------------------- held out of training
def test_synthetic_eval_prompts_never_come_from_the_training_stream():
    r = load_recipe(None, ["eval.every=5", "eval.prompts=40", "eval.seed=7"])
    held = {row["prompt"] for row in eval_rows(r, PromptStream(r.data, r.seed))}
    assert len(held) == 40  # distinct problems
    plain = {row["prompt"] for row in PromptStream(r.data, r.seed).take(4000)}
    assert held <= plain  # without the rule, training would draw every one of them
    stream = PromptStream(r.data, r.seed)
    eval_rows(r, stream)
    trained = [row["prompt"] for row in stream.take(4000)]
    assert not held & set(trained)
    again = PromptStream(r.data, r.seed)  # the same recipe holds out the same problems: a resume's stream matches
    eval_rows(r, again)
    assert [row["prompt"] for row in again.take(50)] == trained[:50]
    assert stream.row_at(123) == again.row_at(123)


def test_eval_off_leaves_the_training_stream_as_it_was():
    r = load_recipe(None)
    stream = PromptStream(r.data, r.seed)
    assert Evaluator.from_recipe(r, stream, None, None, None, Path("."), lambda: 0) is None
    assert stream.take(30) == PromptStream(r.data, r.seed).take(30)


def test_holding_out_too_many_problems_is_refused():
    r = load_recipe(None, ["eval.every=5", "eval.prompts=300", "data.arithmetic.max_value=19"])  # 400 problems
    with pytest.raises(RecipeError, match=r"eval\.prompts = 300 .*400 problems"):
        eval_rows(r, PromptStream(r.data, r.seed))


def test_a_file_source_drops_prompts_the_training_file_holds(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(10)))
    held.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(8, 14)))
    r = load_recipe(None, [f"data.source={train}", "eval.every=2", f"eval.source={held}", "eval.prompts=3"])
    assert [row["prompt"] for row in eval_rows(r, PromptStream(r.data, r.seed))] == ["q10", "q11", "q12"]


# ---------------------------------------------------------------- recipe keys
@pytest.mark.parametrize("overrides, words", [
    (["eval.samples_per_prompt=2", "eval.pass_k=[1,4]"], "'eval.pass_k' = [1, 4]"),
    (["eval.temperature=0", "eval.samples_per_prompt=4"], "eval.samples_per_prompt=1"),
    (["eval.every=-1"], "'eval.every' must be >= 0"),
    (["eval.every=5", "data.source=x.jsonl"], "set eval.source"),
    (["eval.every=5", "data.source=x.jsonl", "eval.source=x.jsonl"], "is the training file"),
    (["eval.reward_fn=nocolon"], "'eval.reward_fn'"),
    (["eval.pass_k=[one]"], "'eval.pass_k' takes a list of integers"),
])
def test_bad_eval_keys_fail_naming_the_key(overrides, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, overrides)
    assert words in str(e.value)


def test_eval_defaults_are_off_and_greedy_single_sample_is_valid():
    r = load_recipe(None, ["eval.temperature=0", "eval.samples_per_prompt=1", "eval.pass_k=[1]"])
    assert r.eval.every == 0 and r.eval.at_start and r.eval.at_end


def test_preflight_checks_the_eval_prompts_and_reward_before_anything_starts(tmp_path):
    from rl.preflight import PreflightError, preflight

    assert any("eval: 64 held-out prompts every 10 steps" in line
               for line in preflight(load_recipe(None, ["eval.every=10"])))
    with pytest.raises(PreflightError) as e:
        preflight(load_recipe(None, ["eval.every=10", "eval.prompts=300", f"eval.reward_fn={tmp_path}/none.py:score"]))
    assert len(e.value.problems) == 2
    assert "eval.reward_fn" in e.value.problems[0] and "eval.prompts = 300" in e.value.problems[1]


# ---------------------------------------------------------------- summary and dashboard words
def test_summary_reports_eval_first_last_and_gain():
    records = [{"step": s, "reward/mean": 0.1 * s} for s in range(10)]
    records[0].update({"eval/reward_mean": 0.2, "eval/version": 0, "eval/pass@1": 0.2, "eval/pass@4": 0.5})
    records[9].update({"eval/reward_mean": 0.5, "eval/version": 10, "eval/pass@1": 0.5, "eval/pass@4": 0.75})
    e = learning_summary(records)["eval"]
    assert e["rounds"] == 2 and (e["first_version"], e["last_version"]) == (0, 10)
    assert e["gain"] == pytest.approx(0.3) and e["pass@4_first"] == 0.5 and e["pass@4_last"] == 0.75
    assert "eval" not in learning_summary(records[1:9])
    assert metric_label("eval/pass@4") == "held-out pass@4 (share of prompts)"


# ---------------------------------------------------------------- the real stack
@pytest.mark.slow
def test_eval_rounds_run_beside_an_async_run_on_versions_the_engines_held(ray_session, tiny_model, tmp_path):
    from rl.controller import Controller

    run_dir = tmp_path / "run"
    recipe = load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false",
        "trainer.total_steps=6", "trainer.batch_groups=4", "rollout.group_size=4", "algorithm.eta=1",
        "resources.wait_timeout_s=120", "trainer.export_final=false",
        "eval.every=3", "eval.prompts=8", "eval.samples_per_prompt=4", "eval.pass_k=[1,4]", "eval.timeout_s=120"])
    ctl = Controller(recipe)
    ctl.build()
    try:
        records = ctl.run()
    finally:
        ctl.shutdown()
    assert [r["step"] for r in records] == list(range(6))
    rounds = [r for r in read_metrics(run_dir) if "eval/reward_mean" in r]
    assert [r["eval/launched_version"] for r in rounds] == [0, 3, 6]  # at the start, every 3 steps, at the end
    assert rounds[-1]["step"] == 5 and rounds[-1]["eval/skipped_rounds"] == 0 == rounds[-1]["eval/failed_rounds"]
    for r in rounds:  # on versions the engines held: from the one at launch to the one held when it was logged
        assert r["eval/launched_version"] <= r["eval/version_min"] <= r["eval/version_max"] <= r["step"] + 1
        assert 0.0 <= r["eval/pass@1"] <= r["eval/pass@4"] <= 1.0 and r["eval/seconds"] > 0
    assert rounds[0]["eval/version_max"] == 0  # before training changed anything
    assert rounds[-1]["eval/version_min"] == 6  # the final weights

    try:
        import pandas as pd

        dumps = {p.name: pd.read_json(p, lines=True).to_dict("records")
                 for p in sorted((run_dir / "eval").glob("step_*"))}
    except ImportError:
        dumps = {p.name: [json.loads(x) for x in p.read_text().splitlines()]
                 for p in sorted((run_dir / "eval").glob("step_*"))}
    assert sorted(dumps) == ["step_000000.jsonl", "step_000003.jsonl", "step_000006.jsonl"]
    for name, r in zip(sorted(dumps), rounds):
        rows = dumps[name]
        assert len(rows) == 8 * 4 and {"prompt", "response", "score", "version", "version_max"} <= set(rows[0])
        assert math.isclose(sum(x["score"] for x in rows) / len(rows), r["eval/reward_mean"])
        assert min(x["version"] for x in rows) == r["eval/version_min"]

    every_round = [json.loads(line) for line in (run_dir / "eval" / "rounds.jsonl").read_text().splitlines()]
    assert [x["eval/reward_mean"] for x in every_round] == [r["eval/reward_mean"] for r in rounds]

    eval_prompts = {x["prompt"] for rows in dumps.values() for x in rows}
    assert len(eval_prompts) == 8
    logged = {row["index"]: row["prompt"]
              for row in read_rows(str(run_dir / "datastore"), "train", ["prompt"]).to_pylist()}
    assert len(logged) >= 6 * 4 * 4 and not eval_prompts & set(logged.values())  # never in the training partition
    trained = [i for line in (run_dir / "trained.jsonl").read_text().splitlines() for i in json.loads(line)["trained"]]
    assert len(trained) == 6 * 4 * 4 and not eval_prompts & {logged[i] for i in trained}  # nor trained on

    summary = json.loads((run_dir / "summary.json").read_text())["eval"]
    assert (summary["rounds"], summary["first_version"], summary["last_version"]) == (3, 0, 6)
    assert summary["gain"] == pytest.approx(rounds[-1]["eval/reward_mean"] - rounds[0]["eval/reward_mean"])
