"""Recovery inside a run, on the real stack: real processes are killed (SIGKILL) mid-run and the run goes on.

Rollout side, one run: the vLLM EngineCore (its worker restarts the engine in place), then the rollout
worker's actor process (a new worker replaces it), then the new worker during a weight sync (the sync goes on
without it and its replacement gets the next). With one engine, each time the trainer's step gives way so
the engine that came back gets the current weights.

Trainer side, one run: a trainer rank, then a storage unit; each time the run goes on from its last
checkpoint in the same process (rl/recovery.py).

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

import psutil
import pytest
import ray

from rl.controller import Controller
from rl.core.config import load_recipe

pytestmark = pytest.mark.slow

BATCH_GROUPS = 8


def _last_step(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    return max([-1] + [json.loads(x)["step"] for x in f.read_text().splitlines()]) if f.exists() else -1


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"the run never got to: {what}"
        time.sleep(0.1)


def _recipe(tiny_model: str, run_dir: Path, steps: int, *extra: str):
    return load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false",
        "trainer.export_final=false", f"trainer.total_steps={steps}", "algorithm.eta=1",
        f"trainer.batch_groups={BATCH_GROUPS}", "resources.wait_timeout_s=120", *extra])


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda w: os.getpid()), timeout=30)


def _check_lineage(run_dir: Path, steps: int, group_size: int, eta: int = 1) -> None:
    """Every step once in metrics.jsonl; no row trained twice (trained.jsonl is rewound at each restart);
    every trained sample within the staleness bound."""
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(steps))
    rows = [i for x in (run_dir / "trained.jsonl").read_text().splitlines() for i in json.loads(x)["trained"]]
    assert len(rows) == len(set(rows)) == steps * BATCH_GROUPS * group_size
    for m in metrics:
        assert all(0 <= int(k) <= eta for k in m["staleness/hist"]), m["staleness/hist"]


def _in_background(faults: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            faults()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, errors


def test_the_rollout_side_survives_its_engine_its_worker_and_its_worker_in_a_sync_dying(ray_session, tiny_model,
                                                                                        tmp_path):
    steps = 24
    run_dir = tmp_path / "run"
    ctl = Controller(_recipe(tiny_model, run_dir, steps))
    ctl.build()
    router, first = ctl.router, ctl.rollouts[0]
    core = ray.get(first.engine_pid.remote(), timeout=30)
    assert core > 0
    kill_in_sync = threading.Event()
    push, seen = ctl.weights._push, {}

    async def push_and_kill(probe: bool):
        if kill_in_sync.is_set():  # the worker dies as the trainer starts sending
            kill_in_sync.clear()
            threading.Timer(0.005, os.kill, (seen["worker"], signal.SIGKILL)).start()
        return await push(probe)

    ctl.weights._push = push_and_kill
    back = lambda: router.healthy[0] and not router.needs_weights[0]  # noqa: E731

    def faults() -> None:
        _until(lambda: _last_step(run_dir) >= 2, 120, "step 2")
        os.kill(core, signal.SIGKILL)  # 1: the engine core
        _until(lambda: router.engine_restarts[0] == 1 and back(), 150, "the engine restarted and synced")
        seen["core"] = ray.get(first.engine_pid.remote(), timeout=30)
        _until(lambda: _last_step(run_dir) >= seen.setdefault("at", _last_step(run_dir)) + 2, 120, "two more steps")
        os.kill(_pid(first), signal.SIGKILL)  # 2: the rollout worker
        _until(lambda: router.respawns[0] == 1 and back(), 150, "the worker replaced and synced")
        seen["worker"] = _pid(ctl.rollouts[0])
        kill_in_sync.set()  # 3: the new worker, in the next sync
        _until(lambda: router.respawns[0] == 2 and back(), 150, "the worker killed in a sync replaced and synced")

    t, errors = _in_background(faults)
    t0 = time.monotonic()
    try:
        records = ctl.run()
    finally:
        ctl.shutdown()
    t.join(timeout=5)
    assert not errors, errors
    assert seen["core"] not in (core, -1) and ctl.rollouts[0] is not first
    assert records[-1]["rollout/engines_restarted"] == 1 and records[-1]["rollout/workers_replaced"] == 2
    _check_lineage(run_dir, steps, ctl.recipe.rollout.group_size)
    print(f"rollout side: {steps} steps with 3 faults in {time.monotonic() - t0:.0f} s")


def _kill_newest(title: str) -> int:
    """SIGKILL the newest process of this test session's Ray whose title holds `title`; its pid."""
    procs = [p for p in psutil.Process().children(recursive=True) if title in " ".join(p.cmdline())]
    assert procs, f"no process titled {title}"
    victim = max(procs, key=lambda p: p.create_time())
    victim.kill()
    return victim.pid


def test_after_a_dead_trainer_rank_then_a_dead_storage_unit_the_run_goes_on_from_its_checkpoints(ray_session,
                                                                                                tiny_model, tmp_path):
    from rl.recovery import read_restarts, run_with_restarts

    steps = 20
    run_dir = tmp_path / "run"
    recipe = _recipe(tiny_model, run_dir, steps, "trainer.checkpoint_every=4", "datastore.num_storage_units=2")
    ckpt = lambda n: (run_dir / "checkpoints" / f"step_{n}").exists()  # noqa: E731

    def faults() -> None:
        _until(lambda: ckpt(4) and _last_step(run_dir) >= 5, 240, "step 5, past the checkpoint at 4")
        _kill_newest("ray::TrainerWorker")
        _until(lambda: len(read_restarts(run_dir)) == 1 and ckpt(12) and _last_step(run_dir) >= 13, 300,
               "the restart and step 13, past the checkpoint at 12")
        _kill_newest("ray::StorageUnit")
        _until(lambda: len(read_restarts(run_dir)) == 2, 120, "the second restart")

    t, errors = _in_background(faults)
    ctl = Controller(recipe)
    final = run_with_restarts(ctl)
    t.join(timeout=5)
    assert not errors, errors
    first, second = read_restarts(run_dir)
    assert "trainer rank" in first["cause"] and first["checkpoint"].endswith("step_4")
    assert "storage unit" in second["cause"] and second["checkpoint"].endswith("step_12")
    assert final is not ctl and final.start_step == 12
    _check_lineage(run_dir, steps, recipe.rollout.group_size)
