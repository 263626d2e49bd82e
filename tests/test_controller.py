"""The controller on the real stack: staleness admission, bad rewards, dynamic sampling, kill -9 + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from datastore.log import read_rows
from rl.core.config import load_recipe
from rl.controller import Controller
from rl.resume import TRAINED
from rl.metrics import read_metrics
from trainer.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def overrides(tiny_model, run_dir, *extra):
    return [f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false",
            "logging.dashboard=false", "trainer.batch_groups=4", "rollout.group_size=4",
            "resources.wait_timeout_s=180", "trainer.export_final=false", *extra]


def run(tiny_model, run_dir, *extra):
    recipe = load_recipe("recipes/cpu_default.yaml", overrides(tiny_model, run_dir, *extra))
    ctl = Controller(recipe)
    ctl.build()
    try:
        return ctl.run()
    finally:
        ctl.shutdown()


def trained_steps(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / TRAINED).read_text().splitlines()]


def logged_rows(run_dir):
    return read_rows(str(Path(run_dir) / "datastore"), "train").to_pylist()


@pytest.mark.parametrize("inline", [False, True], ids=["reward-workers", "reward-inline"])
def test_bound_holds_for_every_sample_and_bad_rewards_do_not_stop_the_run(ray_session, tiny_model, tmp_path, inline):
    eta = 2
    records = run(tiny_model, tmp_path / "r", "trainer.total_steps=6", f"algorithm.eta={eta}",
                  f"reward.fn={HERE / 'flaky_reward.py'}:unreliable", "reward.timeout_s=0.5",
                  "data.arithmetic.max_value=49", f"reward.inline={str(inline).lower()}")
    assert len(records) == 6
    version = {r["index"]: r["version"] for r in logged_rows(tmp_path / "r")}
    token_versions = {r["index"]: r["token_versions"] for r in logged_rows(tmp_path / "r")}
    checked = 0
    for rec in trained_steps(tmp_path / "r"):
        for i in rec["trained"]:
            assert 0 <= rec["step"] - version[i] <= eta, (rec["step"], i, version[i])  # admission kept the bound
            assert version[i] == min(token_versions[i])
            checked += 1
    assert checked == 6 * 16
    errors = sum(r["reward/errors"] for r in records)
    assert errors > 0  # raising, NaN, wrong-type and hanging calls were reported ...
    infos = [json.loads(r["reward_info"]) for r in logged_rows(tmp_path / "r") if r["reward_info"]]
    kinds = " ".join(i.get("error", "") for i in infos)
    for words in ("raised ValueError", "non-finite", "returned str", "timed out"):
        assert words in kinds, words
    # ... and scored error_score (0), so every trained reward is a number in [0, 1]
    assert all(0.0 <= r["reward"] <= 1.0 for r in logged_rows(tmp_path / "r"))


def test_dynamic_sampling_keeps_batches_full(ray_session, tiny_model, tmp_path):
    records = run(tiny_model, tmp_path / "d", "trainer.total_steps=4", "algorithm.dynamic_sampling=true",
                  f"reward.fn={HERE / 'flaky_reward.py'}:equal_for_even")
    assert [r["samples"] for r in records] == [16] * 4  # every batch full
    assert records[-1]["dynamic_sampling/dropped_groups"] > 0
    rows = {r["index"]: r for r in logged_rows(tmp_path / "d")}
    for rec in trained_steps(tmp_path / "d"):
        groups = Counter(i // 4 for i in rec["trained"])
        assert all(c == 4 for c in groups.values()) and len(groups) == 4
        for g in groups:
            rewards = {rows[g * 4 + j]["reward"] for j in range(4)}
            assert len(rewards) > 1  # no signal-free group reached the trainer


def newest_version(row):
    """The newest policy version that made any token of a logged sample (its `version` is the oldest's)."""
    return max([row["version"], *(row["token_versions"] or [])])


def checkpoint_step(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else int(ckpt.name.split("_")[1])


def lineage_to_lose(run_dir):
    """Mid-run, with a checkpoint S, samples in the log that versions after S helped make, and the next
    checkpoint (after step S + 3) at least a step away: one completing between this look and the kill
    would leave no lineage to lose."""
    step = checkpoint_step(run_dir)
    return (step is not None and step >= 4 and step + 1 <= len(read_metrics(run_dir)) <= step + 2
            and any(newest_version(r) > step for r in logged_rows(run_dir)))


def test_a_stage_that_fails_ends_the_run_in_seconds_naming_it(ray_session, tiny_model, tmp_path):
    """Dynamic sampling gives up (every group carries no signal): the loop, waiting on the first step, ends
    the run at once with that stage's error, long before any wait's timeout (resources.wait_timeout_s)."""
    recipe = load_recipe("recipes/cpu_default.yaml", overrides(
        tiny_model, tmp_path / "f", "trainer.total_steps=50", "algorithm.dynamic_sampling=true",
        "algorithm.dynamic_sampling_max_drops=4", f"reward.fn={HERE / 'flaky_reward.py'}:constant"))
    ctl = Controller(recipe)
    ctl.build()
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"^dynamic sampling failed while training step 0 waited: "
                                               r"dynamic sampling dropped \d+ groups in a row"):
            ctl.run()
    finally:
        ctl.shutdown()
    assert time.monotonic() - t0 < 30 < recipe.resources.wait_timeout_s


def test_kill_driver_then_resume(tiny_model, tmp_path):
    """kill -9 of the driver mid-run, then `streamrl resume`: every step once, every sample trained at most
    once and within eta of its step across the restart; finished samples of the checkpoint's lineage are
    trained (not made again), samples that versions after the checkpoint helped make never are."""
    run_dir, eta, n, steps = tmp_path / "k", 1, 4, 24  # enough steps that a quiet box cannot finish first
    cmd = [sys.executable, "-m", "rl.cli", "run", "recipes/cpu_default.yaml",
           *overrides(tiny_model, run_dir, f"trainer.total_steps={steps}", "trainer.checkpoint_every=4", f"algorithm.eta={eta}",
                     f"reward.fn={HERE / 'flaky_reward.py'}:slow_exact")]  # slow: the kill lands between checkpoints
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while not lineage_to_lose(run_dir):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-run, with no chance to clean up
    proc.wait(timeout=60)
    time.sleep(5)  # Ray reaps the dead driver's actors
    start = checkpoint_step(run_dir)
    before = {r["index"]: r for r in logged_rows(run_dir)}
    done = {i for rec in trained_steps(run_dir) if rec["step"] < start for i in rec["trained"] + rec["dropped"]}
    lost_groups = {i // n for i, r in before.items() if newest_version(r) > start}
    lost = {i for i in before if i // n in lost_groups}
    waiting = set(before) - done - lost  # finished, untrained, made by the checkpoint's ancestors
    assert lost and waiting

    out = subprocess.run([sys.executable, "-m", "rl.cli", "resume", str(run_dir)], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed at step {start}" in out.stdout
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(steps))  # every step once: none lost, none repeated
    records = trained_steps(run_dir)
    trained = [i for rec in records for i in rec["trained"]]
    assert len(trained) == len(set(trained)) == steps * 16  # no sample trained twice
    after = {r["index"]: r for r in logged_rows(run_dir)}
    assert set(trained) <= set(after)  # every trained sample is in the rollout log
    for rec in records:
        for i in rec["trained"]:  # the staleness rule held across the restart, on every token
            assert 0 <= rec["step"] - after[i]["version"] <= eta and newest_version(after[i]) <= rec["step"], (rec, i)
    later = {i for rec in records if rec["step"] >= start for i in rec["trained"] + rec["dropped"]}
    assert waiting <= later and waiting & set(trained)  # reused ...
    assert all(after[i]["_logged_at"] == before[i]["_logged_at"] for i in waiting | lost)  # ... not made again
    assert not lost & set(trained)
    assert {i for rec in records for i in rec.get("lost_lineage", [])} == lost
    new = [r for i, r in after.items() if i not in before]
    assert new and all(r["version"] >= start for r in new)  # the engines restarted on the checkpoint's weights


def test_colocated_sync_mode_time_shares(ray_session, tiny_model, tmp_path):
    """eta = 0 with colocation: each step's groups finish, engines sleep, the trainer steps, engines wake; eval
    rounds (rl/evaluation.py) end before the engines sleep."""
    records = run(tiny_model, tmp_path / "c", "trainer.total_steps=3", "algorithm.eta=0", "resources.placement=timeshare",
                  "eval.every=2", "eval.prompts=4", "eval.samples_per_prompt=2")
    assert len(records) == 3 and all(r["staleness/max"] == 0 for r in records)  # on-policy
    rounds = [json.loads(line) for line in (tmp_path / "c" / "eval" / "rounds.jsonl").read_text().splitlines()]
    versions = [(r["eval/launched_version"], r["eval/version_min"], r["eval/version_max"]) for r in rounds]
    assert versions == [(0, 0, 0), (2, 2, 2), (3, 3, 3)]  # no sync cut a round: the engines slept only between them
    assert records[-1]["eval/launched_version"] == 3
    spans = [json.loads(line) for line in (tmp_path / "c" / "timeline.jsonl").read_text().splitlines()]
    gen = [(s["start"], s["end"]) for s in spans if s["kind"] in ("generate", "eval")]
    assert sum(s["kind"] == "eval" for s in spans) == 4 + 4 + 4  # one span per prompt of each round
    train = [(s["start"], s["end"]) for s in spans if s["actor"] == "trainer" and s["kind"] == "train"]
    assert gen and len(train) == 3
    for t0, t1 in train:  # no generation while the trainer holds the devices
        assert not any(g0 < t1 - 0.05 and g1 > t0 + 0.05 for g0, g1 in gen), (t0, t1)
