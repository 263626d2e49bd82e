"""The whole loop on CUDA: colocated synchronous mode on one GPU (engine sleeps while the trainer steps),
and disaggregated asynchronous mode on two. Run on a GPU machine: python -m pytest -q -m gpu tests/test_gpu_e2e.py"""

import pytest

from rl.config import load_recipe
from rl.controller import Controller

from helpers import logprob_gap

pytestmark = pytest.mark.gpu


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run(recipe_file, tiny_model, tmp_path, *extra):
    recipe = load_recipe(recipe_file, [
        f"model.path={tiny_model}", "model.dtype=float32", "data.source=synthetic:arithmetic", "data.template=",
        "data.chat_template=false", "reward.fn=rl.rewards:arithmetic_exact", "rollout.max_tokens=8",
        "rollout.max_model_len=64", "rollout.enforce_eager=true", "trainer.total_steps=4", "trainer.batch_groups=8",
        f"logging.run_dir={tmp_path}", "logging.progress=false", "logging.dashboard=false", "trainer.lr=5e-4", *extra])
    ctl = Controller(recipe)
    ctl.build()
    try:
        records = ctl.run()
        diff = logprob_gap(ctl)
    finally:
        ctl.shutdown()
    print(f"{recipe_file}: max |trainer - engine| logprob after {len(records)} syncs: {diff:.2e}")
    return records, diff


def test_colocated_sync_on_one_gpu(ray_session, tiny_model, tmp_path):
    if _gpus() < 1:
        pytest.skip("needs a GPU")
    records, diff = _run("recipes/gpu_1x_colocated_sync.yaml", tiny_model, tmp_path, "trainer.compute_dtype=float32")
    assert len(records) == 4 and all(r["staleness/max"] == 0 for r in records)
    assert diff < 1e-3


def test_disaggregated_async_on_two_gpus(ray_session, tiny_model, tmp_path):
    if _gpus() < 2:
        pytest.skip("needs 2 GPUs")
    records, diff = _run("recipes/gpu_2x_async.yaml", tiny_model, tmp_path, "trainer.compute_dtype=float32")
    assert len(records) == 4 and all(r["staleness/max"] <= 2 for r in records)
    assert diff < 1e-3
