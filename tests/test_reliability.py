"""Reliability (issue 19): nothing in a run directory runs on load, Ray started by streamrl listens on
localhost, a dead reward worker or engine is seen at once, trackers cannot hold the loop, and SIGINT /
SIGTERM stop a run cleanly with the resume command."""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer import checkpoint


class Planted:
    """A pickle that would create `marker` when unpickled (what an attacker plants in a run directory)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def one_rank(tmp_path):
    """A single-process gloo group (the collective a checkpoint save and load need), torn down after."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()


def small_trainer(version: int) -> SimpleNamespace:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    return SimpleNamespace(model=model, optim=optim, sched=sched, critic=None, version=version)


def test_a_checkpoint_loads_with_its_rng_state_and_a_planted_pickle_never_runs(tmp_path, one_rank):
    path = tmp_path / "checkpoints" / "step_3"
    checkpoint.save(small_trainer(3), path, one_rank, use_async=False)
    expected = (torch.rand(1).item(), random.random())
    torch.rand(5), random.random()  # move the streams on; the load must bring them back
    trainer = small_trainer(0)
    assert checkpoint.load(trainer, path, one_rank) == 3
    assert (torch.rand(1).item(), random.random()) == expected
    checkpoint.verify(path)  # a checkpoint streamrl wrote passes the check

    marker = tmp_path / "pwned"
    for planted in (path / "rng" / "rank_0.pt", path / ".metadata"):
        original = planted.read_bytes()
        if planted.suffix == ".pt":
            torch.save({"torch": Planted(marker)}, planted)
        else:
            planted.write_bytes(pickle.dumps(Planted(marker)))
        with pytest.raises(checkpoint.UnsafeCheckpoint, match=f"{planted}.*not written by streamrl"):
            checkpoint.verify(path)
        with pytest.raises(checkpoint.UnsafeCheckpoint, match=str(planted)):
            checkpoint.load(small_trainer(0), path, one_rank)
        assert not marker.exists()
        planted.write_bytes(original)


def test_dcp_non_tensor_items_are_checked_before_dcp_unpickles_them(tmp_path):
    import io

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"lr_lambdas": [Planted(marker)]}, buf)
    buf.seek(0)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="sched"))
    with pytest.raises(checkpoint.UnsafeCheckpoint, match="item sched"):
        checkpoint._dcp_planner(tmp_path).load_bytes(item, buf)
    assert not marker.exists()


def test_resume_refuses_a_planted_checkpoint_before_anything_starts(tmp_path, capsys):
    from rl import cli
    from rl.core.config import load_recipe, to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_recipe(None, ["trainer.checkpoint_every=2"])))
    ckpt = tmp_path / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    assert cli.main(["resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{ckpt / '.metadata'} holds more than saved state" in err and "resume from a checkpoint you trust" in err
    assert not marker.exists()
    assert not (tmp_path / "datastore").exists()  # nothing started


# ---------------------------------------------------------------- a Ray that streamrl starts listens on localhost

LISTENERS = """
import json, psutil, ray
from rl.core.config import load_recipe
from rl.controller import init_ray

init_ray(load_recipe(None, ["resources.num_cpus=1"]))
ray.get(ray.remote(num_cpus=0)(lambda: 1).remote(), timeout=120)  # a worker process is up too
me = psutil.Process()
found = set()
for p in [me, *me.children(recursive=True)]:
    try:
        found |= {(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print(json.dumps(sorted(found)))
ray.shutdown()
"""


def test_a_ray_that_streamrl_starts_listens_on_localhost_only():
    import json
    import subprocess
    import sys

    from rl.controller import ray_listen_args

    assert ray_listen_args("0.0.0.0") == {"dashboard_host": "0.0.0.0"}  # asked for: Ray's own default
    assert ray_listen_args("10.1.2.3") == {"_node_ip_address": "10.1.2.3", "dashboard_host": "10.1.2.3"}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    listeners = json.loads(out.stdout.strip().splitlines()[-1])
    names = {name for name, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # Ray's own servers were seen ...
    wide = [(name, ip) for name, ip in listeners if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not wide, f"listening beyond loopback: {wide}"  # ... and none listens beyond this machine


# ---------------------------------------------------------------- fail fast: a dead reward worker

DIES = '''
import os


def score(sample):
    os._exit(3)  # the reward worker's process ends on its first call
'''


@pytest.mark.slow
def test_a_reward_worker_that_dies_ends_the_run_in_seconds_naming_it(ray_session, tiny_model, tmp_path):
    import time

    from rl.core.config import load_recipe
    from rl.controller import Controller

    (tmp_path / "dies.py").write_text(DIES)
    wait_timeout_s = 120
    recipe = load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={tmp_path / 'run'}", "logging.progress=false",
        "logging.dashboard=false", "trainer.batch_groups=2", "rollout.group_size=2", "trainer.total_steps=3",
        "trainer.export_final=false", f"resources.wait_timeout_s={wait_timeout_s}", "reward.inline=false",
        "reward.num_workers=1", f"reward.fn={tmp_path / 'dies.py'}:score"])
    ctl = Controller(recipe)
    ctl.build()
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"the reward stage \(reward worker 0\) failed while training step 0") as err:
            ctl.run()
        elapsed = time.monotonic() - t0
    finally:
        ctl.shutdown()
    assert elapsed < 30 < wait_timeout_s, elapsed  # seen at once, not after the wait timeout
    msg = str(err.value)
    assert "its process died" in msg and f"reward.fn={tmp_path / 'dies.py'}:score" in msg and "\n" not in msg, msg


def test_why_a_worker_ended_fits_one_line(ray_session):
    """Ray's actor errors are a page; the stage error keeps the user's exception or how the process exited."""
    import ray

    from rl.reward_worker import death_cause

    @ray.remote(num_cpus=0)
    class Broken:
        def __init__(self, how: str) -> None:
            if how == "import":
                import streamrl_no_such_reward_module  # noqa: F401

        def call(self) -> None:
            os._exit(3)

    errors = []
    for how in ("import", "exit"):
        with pytest.raises(ray.exceptions.RayActorError) as err:
            ray.get(Broken.remote(how).call.remote(), timeout=60)
        errors.append(death_cause(err.value))
    assert errors[0] == "it could not start: ModuleNotFoundError: No module named 'streamrl_no_such_reward_module'"
    assert errors[1].startswith("its process died (") and "\n" not in errors[1], errors[1]


# ---------------------------------------------------------------- the router re-queues a dead engine's samples

@pytest.fixture
def engines(ray_session):
    """Two stand-in rollout workers below the router: engine 0 dies on its first group, engine 1 works."""
    import ray

    @ray.remote(num_cpus=0)
    class Engine:
        def __init__(self, dies: bool) -> None:
            self.dies = dies

        def generate_group(self, req):
            if self.dies:
                os._exit(1)
            from rollout.records import GroupResult

            return GroupResult(req.group, done=req.sample_ids(), tokens=3 * len(req.sample_ids()))

    workers = [Engine.remote(True), Engine.remote(False)]
    yield workers
    for w in workers:
        ray.kill(w)


def test_the_router_requeues_a_dead_engines_samples_on_the_survivor(engines):
    import asyncio

    from rollout.router import RolloutRouter
    from rollout.records import GroupRequest, GroupResult

    router = RolloutRouter(engines, max_tokens=8, timeout_s=60)
    req = GroupRequest(group=5, prompt="1+1=", prompt_ids=[1, 2, 3], row="{}", n=4)
    res = asyncio.run(router.run_group(req))
    assert res == GroupResult(5, done=[0, 1, 2, 3], tokens=12, attempts=2)
    assert router.routed == [1, 1] and router.healthy == [False, True]
    (failure,) = router.failures
    assert failure["engine"] == 0 and failure["samples"] == [0, 1, 2, 3] and "rollout worker 0 died" in failure["error"]
    assert not router.restarts  # a dead actor is not restarted in place


# ---------------------------------------------------------------- SIGTERM / Ctrl-C stop a run cleanly

@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_run_cleanly_and_says_how_to_resume(tiny_model, tmp_path, sig):
    import json
    import signal
    import subprocess
    import sys
    import time

    from rl.metrics import read_metrics, read_status
    from trainer.checkpoint import latest_checkpoint

    run_dir, out = tmp_path / "run", tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "rl.cli", "run", "recipes/cpu_default.yaml", f"model.path={tiny_model}",
           f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false", "trainer.batch_groups=2",
           "rollout.group_size=4", "trainer.total_steps=200", "trainer.checkpoint_every=1", "trainer.export_final=false",
           "resources.wait_timeout_s=120"]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).parent.parent)
        try:
            deadline = time.time() + 400
            while not read_metrics(run_dir):
                assert proc.poll() is None, out.read_text()[-3000:]
                assert time.time() < deadline, "the run made no step"
                time.sleep(0.5)
            proc.send_signal(signal.Signals[sig])  # SIGINT: what Ctrl-C sends
            t0 = time.time()
            rc = proc.wait(timeout=180)
            stop_s = time.time() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = out.read_text()
    assert rc == 128 + signal.Signals[sig], text[-3000:]  # 143 / 130
    assert f"stopped by {sig}" in text and f"streamrl resume {run_dir}" in text, text[-3000:]
    assert "Traceback" not in text, text[-5000:]
    assert read_status(run_dir)["state"] == "stopped"
    assert latest_checkpoint(run_dir) is not None  # the checkpoint being written when the signal came was finished
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(len(steps))) and len(steps) < 200
    assert stop_s < 60, stop_s
    print(json.dumps({"stop_s": stop_s, "steps": len(steps)}), text[-800:])
