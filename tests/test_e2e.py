"""End to end on the real stack: Ray actors, vLLM (CPU), FSDP2 over gloo, the data store."""

import json
import subprocess
import sys

import pytest

from rl.config import load_recipe
from rl.controller import Controller
from rl.metrics import read_metrics

pytestmark = pytest.mark.slow


def small_recipe(tiny_model, run_dir, *extra):
    return load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false",
        "trainer.total_steps=6", "trainer.batch_groups=4", "rollout.group_size=4", "algorithm.eta=1",
        "resources.wait_timeout_s=120", *extra,
    ])


def test_async_run_with_two_fsdp_ranks_and_exact_weight_sync(ray_session, tiny_model, tmp_path):
    recipe = small_recipe(tiny_model, tmp_path / "run", "trainer.world_size=2")
    ctl = Controller(recipe)
    ctl.build()
    try:
        records = ctl.run()
        # after 6 weight syncs the engine and the trainer agree on every token's logprob
        ids = ctl.tokenizer("13+5=")["input_ids"] + ctl.tokenizer("18", add_special_tokens=False)["input_ids"] + [2]
        trainer_lp = ctl.trainer.sequence_logprobs(ids)
        engine_lp = ray_session.get(ctl.rollouts[0].prompt_logprobs.remote(ids), timeout=60)
    finally:
        ctl.shutdown()
    diffs = [abs(a - b) for a, b in zip(trainer_lp[1:], engine_lp[1:])]
    print("max |trainer - engine| logprob after sync:", max(diffs))
    assert max(diffs) < 1e-4

    assert [r["step"] for r in records] == list(range(6))
    assert records[-1]["version"] == 6
    on_disk = read_metrics(tmp_path / "run")
    assert len(on_disk) == 6
    for r in on_disk:
        assert r["samples"] == 16
        assert r["staleness/max"] <= 1  # eta = 1: no sample older than one version is trained on
        for key in ("reward/mean", "response/len_mean", "actor/kl_behaviour", "actor/ratio_mean",
                    "throughput/samples_per_s", "staleness/mean", "sync/total_s"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert 0.0 <= r["reward/mean"] <= 1.0
    assert (tmp_path / "run" / "config.yaml").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def test_engine_matches_trainer_before_any_update(ray_session, tiny_model, tmp_path):
    """Same weights loaded two ways (vLLM, transformers+FSDP2) give the same logprobs at version 0."""
    recipe = small_recipe(tiny_model, tmp_path / "run0", "trainer.total_steps=1")
    ctl = Controller(recipe)
    ctl.build()
    try:
        ids = ctl.tokenizer("7+9=16")["input_ids"] + [2]
        trainer_lp = ctl.trainer.sequence_logprobs(ids)
        engine_lp = ray_session.get(ctl.rollouts[0].prompt_logprobs.remote(ids), timeout=60)
    finally:
        ctl.shutdown()
    assert max(abs(a - b) for a, b in zip(trainer_lp[1:], engine_lp[1:])) < 1e-4


def test_cli_rejects_bad_key_before_starting_anything():
    out = subprocess.run([sys.executable, "-m", "rl.cli", "run", "recipes/cpu_default.yaml", "rollout.temprature=0.5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "rollout.temprature" in out.stderr and "rollout.temperature" in out.stderr
