"""The watchdog on the real stack: a frozen (SIGSTOP) rollout worker and then a frozen trainer rank are named
while the run waits on them, the run recovers when the rollout worker resumes, and the frozen trainer rank
is named in the error that ends the run (rl/watchdog.py)."""

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from rl.controller import Controller
from rl.core.config import load_recipe
from rl.core.waits import WaitTimeout

pytestmark = pytest.mark.slow


def _steps(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _until(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)


def test_watchdog_names_a_frozen_rollout_worker_then_a_frozen_trainer_rank(ray_session, tiny_model, tmp_path, caplog):
    run_dir = tmp_path / "run"
    recipe = load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false",
        "trainer.export_final=false", "trainer.total_steps=60", "algorithm.eta=1", "resources.stall_warn_s=3",
        "resources.wait_timeout_s=90"])
    ctl = Controller(recipe)
    ctl.build()
    rollout_pid = ray.get(ctl.rollouts[0].__ray_call__.remote(lambda w: os.getpid()), timeout=30)
    trainer_pid = ray.get(ctl.trainer.ranks[0].__ray_call__.remote(lambda w: os.getpid()), timeout=30)
    ctl.trainer.timeout = 10  # the frozen rank's step times out after 2 x 10 s (the build needed the long one)
    events: dict[str, float] = {}

    def freeze() -> None:
        try:
            _until(lambda: _steps(run_dir) >= 2, 120)
            os.kill(rollout_pid, signal.SIGSTOP)
            events["rollout_stopped"] = time.monotonic()
            time.sleep(10)
            os.kill(rollout_pid, signal.SIGCONT)
            events["rollout_resumed"] = time.monotonic()
            done = _steps(run_dir)
            _until(lambda: _steps(run_dir) >= done + 2, 60)  # the run goes on
            events["trainer_stopped"] = time.monotonic()
            os.kill(trainer_pid, signal.SIGSTOP)
        finally:
            os.kill(rollout_pid, signal.SIGCONT)

    t = threading.Thread(target=freeze, daemon=True)
    t.start()
    try:
        with caplog.at_level(logging.WARNING, logger="rl.watchdog"):
            with pytest.raises(WaitTimeout) as err:
                ctl.run()
    finally:
        os.kill(trainer_pid, signal.SIGCONT)
        ctl.shutdown()
    t.join(timeout=5)
    warnings = [r.getMessage() for r in caplog.records if r.name == "rl.watchdog"]
    print("\n---\n".join(w[:400] for w in warnings))
    assert "trainer_stopped" in events, "the run did not go on after the rollout worker resumed"
    assert any("rollout worker 0 did not answer" in w for w in warnings), warnings
    assert any("trainer rank 0 did not answer" in w for w in warnings), warnings
    # the frozen rank is named whichever wait timed out first (its train step, or the sync after it)
    assert "trainer rank 0 did not answer" in str(err.value)
