"""Recovery inside a run, on the real stack: a real process is killed (SIGKILL) mid-run and the run goes on.

- the rollout worker's actor process: a new worker replaces it, the trainer's step gives way so the current
  weights reach it (the only engine), and the run finishes;
- the vLLM EngineCore process: the worker restarts its engine in place, then the same;
- the rollout worker during a weight sync: the sync goes on without it, and its replacement gets the next.

Every run must finish all its steps with every trained row trained once and the staleness rule held.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import ray

from rl.controller import Controller
from rl.core.config import load_recipe

pytestmark = pytest.mark.slow

STEPS = 16


def _steps(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)


def _controller(tiny_model: str, run_dir: Path, *extra: str) -> Controller:
    recipe = load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false",
        "trainer.export_final=false", f"trainer.total_steps={STEPS}", "algorithm.eta=1", "trainer.batch_groups=8",
        "resources.wait_timeout_s=120", *extra])
    ctl = Controller(recipe)
    ctl.build()
    return ctl


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda w: os.getpid()), timeout=30)


def _check_run(ctl: Controller, run_dir: Path, records: list[dict]) -> dict:
    """Every step ran; no row was trained twice; every trained sample was within the staleness bound."""
    assert [r["step"] for r in records] == list(range(STEPS))
    trained: list[int] = []
    for line in (run_dir / "trained.jsonl").read_text().splitlines():
        trained += json.loads(line)["trained"]
    assert len(trained) == len(set(trained)) == STEPS * 8 * ctl.recipe.rollout.group_size
    eta = ctl.recipe.algorithm.eta
    for r in records:
        assert all(0 <= int(k) <= eta for k in r["staleness/hist"]), r["staleness/hist"]
    return records[-1]


def _run_with(ctl: Controller, fault: Callable[[], None]) -> tuple[list[dict], dict[str, float]]:
    events: dict[str, float] = {}
    errors: list[BaseException] = []

    def inject() -> None:
        try:
            fault()
            events["fault"] = time.monotonic()
            done = _steps(ctl.run_dir)
            _until(lambda: _steps(ctl.run_dir) > done, 150)
            events["next_step"] = time.monotonic()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    t = threading.Thread(target=inject, daemon=True)
    t.start()
    try:
        records = ctl.run()
    finally:
        ctl.shutdown()
    t.join(timeout=5)
    assert not errors, errors
    return records, events


def test_a_killed_rollout_worker_is_replaced_and_the_run_finishes(ray_session, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    ctl = _controller(tiny_model, run_dir)
    pid = _pid(ctl.rollouts[0])
    old = ctl.rollouts[0]

    def kill() -> None:
        _until(lambda: _steps(run_dir) >= 3, 120)
        os.kill(pid, signal.SIGKILL)

    records, events = _run_with(ctl, kill)
    last = _check_run(ctl, run_dir, records)
    assert ctl.rollouts[0] is not old and ctl.router.respawns == [1]
    assert last["rollout/workers_replaced"] == 1
    print(f"rollout worker killed: next step {events['next_step'] - events['fault']:.1f} s later")


def test_a_killed_engine_core_is_restarted_in_place_and_the_run_finishes(ray_session, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    ctl = _controller(tiny_model, run_dir)
    worker = ctl.rollouts[0]
    core = ray.get(worker.engine_pid.remote(), timeout=30)
    assert core > 0
    new_core: list[int] = []

    def kill() -> None:
        _until(lambda: _steps(run_dir) >= 3, 120)
        os.kill(core, signal.SIGKILL)
        _until(lambda: ctl.router.engine_restarts[0] == 1, 150)
        new_core.append(ray.get(worker.engine_pid.remote(), timeout=30))

    records, events = _run_with(ctl, kill)
    last = _check_run(ctl, run_dir, records)
    assert ctl.rollouts[0] is worker and ctl.router.respawns == [0]
    assert last["rollout/engines_restarted"] == 1
    assert new_core and new_core[0] not in (core, -1)  # a new engine core
    print(f"engine core killed: back and next step {events['next_step'] - events['fault']:.1f} s later")


def test_a_rollout_worker_killed_during_a_weight_sync_is_replaced(ray_session, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    ctl = _controller(tiny_model, run_dir)
    pid = _pid(ctl.rollouts[0])
    push = ctl.weights._push
    calls = {"n": 0}

    async def push_and_kill(probe: bool):
        calls["n"] += 1
        if calls["n"] == 4:  # the sync after step 3: the worker dies as the trainer starts sending
            threading.Timer(0.005, os.kill, (pid, signal.SIGKILL)).start()
        return await push(probe)

    ctl.weights._push = push_and_kill
    records, events = _run_with(ctl, lambda: _until(lambda: calls["n"] >= 4, 120))
    _check_run(ctl, run_dir, records)
    assert ctl.router.respawns == [1]
    print(f"rollout worker killed in a sync: next step {events['next_step'] - events['fault']:.1f} s later")


# ---------------------------------------------------------------- a dead trainer rank or storage unit: restart from the checkpoint

def _lineage(run_dir: Path) -> list[int]:
    """Every row the final lineage trained on (trained.jsonl is rewound at each restart)."""
    rows: list[int] = []
    for line in (run_dir / "trained.jsonl").read_text().splitlines():
        rows += json.loads(line)["trained"]
    return rows


@pytest.mark.parametrize("victim", ["trainer rank", "storage unit"])
def test_after_a_dead_trainer_rank_or_storage_unit_the_run_goes_on_from_its_checkpoint(ray_session, tiny_model, tmp_path,
                                                                                       victim):
    from rl.recovery import read_restarts, run_with_restarts
    from rl.resume import read_jsonl

    run_dir = tmp_path / "run"
    recipe = load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false",
        "trainer.export_final=false", f"trainer.total_steps={STEPS}", "algorithm.eta=1", "trainer.batch_groups=8",
        "trainer.checkpoint_every=4", "resources.wait_timeout_s=120", "datastore.num_storage_units=2"])
    ctl = Controller(recipe)
    killed: dict[str, float] = {}

    def kill() -> None:  # once the first checkpoint is complete and the run is past it
        _until(lambda: (run_dir / "checkpoints" / "step_4").exists() and _steps(run_dir) >= 6, 240)
        actor = ctl.trainer.ranks[0] if victim == "trainer rank" else ctl.store.units[1]
        os.kill(_pid(actor), signal.SIGKILL)
        killed["at"] = time.monotonic()

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    final = run_with_restarts(ctl)
    t.join(timeout=5)
    assert killed, "the fault was never injected"
    (restart,) = read_restarts(run_dir)
    assert victim in restart["cause"] and restart["checkpoint"].endswith("step_4")
    assert final is not ctl and final.start_step == 4
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(STEPS))  # every step once: those after the checkpoint ran again
    rows = _lineage(run_dir)
    assert len(rows) == len(set(rows)) == STEPS * 8 * recipe.rollout.group_size  # none trained twice
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        assert all(0 <= int(k) <= 1 for k in m["staleness/hist"]), m["staleness/hist"]
