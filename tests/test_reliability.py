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
    from rl.config import load_recipe, to_yaml

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


# ---------------------------------------------------------------- fail fast: a dead reward worker

DIES = '''
import os


def score(sample):
    os._exit(3)  # the reward worker's process ends on its first call
'''


@pytest.mark.slow
def test_a_reward_worker_that_dies_ends_the_run_in_seconds_naming_it(ray_session, tiny_model, tmp_path):
    import time

    from rl.config import load_recipe
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
    assert "died" in str(err.value) or "exit" in str(err.value), str(err.value)


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
            return {"done": req.sample_ids(), "failed": [], "tokens": 3 * len(req.sample_ids())}

    workers = [Engine.remote(True), Engine.remote(False)]
    yield workers
    for w in workers:
        ray.kill(w)


def test_the_router_requeues_a_dead_engines_samples_on_the_survivor(engines):
    import asyncio

    from rollout.router import RolloutRouter
    from rollout.worker import GroupRequest

    router = RolloutRouter(engines, max_tokens=8, timeout_s=60)
    req = GroupRequest(group=5, prompt="1+1=", prompt_ids=[1, 2, 3], row="{}", n=4)
    res = asyncio.run(router.run_group(req))
    assert res == {"group": 5, "done": [0, 1, 2, 3], "tokens": 12, "attempts": 2}
    assert router.routed == [1, 1] and router.healthy == [False, True]
    (failure,) = router.failures
    assert failure["engine"] == 0 and failure["samples"] == [0, 1, 2, 3] and "rollout worker 0 died" in failure["error"]
    assert not router.restarts  # a dead actor is not restarted in place
