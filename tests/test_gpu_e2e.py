"""The whole loop on CUDA, in each placement that one or two GPUs allow: timeshare (eta 0, the engine sleeps
while the trainer steps), share (eta 1 and 2: engine and trainer resident on one GPU at once) and separate
(two GPUs). Per-token versions and the staleness bound are checked on every trained sample.
Run on a GPU machine: python -m pytest -q -m gpu tests/test_gpu_e2e.py"""

import json
from pathlib import Path

import pytest

from datastore.log import read_rows
from rl.core.config import load_recipe
from rl.controller import Controller
from rl.resume import TRAINED

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
        f"logging.run_dir={tmp_path}", "logging.progress=false", "logging.dashboard=false", "trainer.lr=5e-4",
        "trainer.compute_dtype=float32", *extra])
    ctl = Controller(recipe)
    ctl.build()
    try:
        records = ctl.run()
        diff = logprob_gap(ctl)
    finally:
        ctl.shutdown()
    print(f"{recipe_file} {' '.join(extra)}: max |trainer - engine| logprob after {len(records)} syncs: {diff:.2e}")
    return records, diff


def check_versions(run_dir: Path, eta: int) -> int:
    """Every trained sample: its version is its first token's, versions never go back, and it was trained
    at most eta versions after it was made. Returns how many samples switched weights mid-generation."""
    rows = {r["index"]: r for r in read_rows(str(run_dir / "datastore"), "train").to_pylist()}
    switched = checked = 0
    for rec in (json.loads(line) for line in (run_dir / TRAINED).read_text().splitlines()):
        for i in rec["trained"]:
            v = rows[i]["token_versions"]
            assert v == sorted(v) and rows[i]["version"] == v[0], (i, v)
            assert 0 <= rec["step"] - rows[i]["version"] <= eta, (rec["step"], i, rows[i]["version"])
            switched += len(set(v)) > 1
            checked += 1
    assert checked > 0
    return switched


def test_timeshare_sync_on_one_gpu(ray_session, tiny_model, tmp_path):
    if _gpus() < 1:
        pytest.skip("needs a GPU")
    records, diff = _run("recipes/gpu_1x_colocated_sync.yaml", tiny_model, tmp_path)
    assert len(records) == 4 and all(r["staleness/max"] == 0 for r in records)
    assert check_versions(tmp_path, 0) == 0  # nothing generates across a sync when the engine sleeps
    assert diff < 1e-3


@pytest.mark.parametrize("eta", [1, 2])
def test_share_async_on_one_gpu(ray_session, tiny_model, tmp_path, eta):
    """Long requests (200 tokens, EOS ignored) so that syncs land mid-generation: those requests are cut and
    continue on the new weights, and their tokens say which version made each."""
    if _gpus() < 1:
        pytest.skip("needs a GPU")
    records, diff = _run("recipes/gpu_1x_async.yaml", tiny_model, tmp_path, f"algorithm.eta={eta}",
                         "rollout.max_tokens=200", "rollout.max_model_len=240", "rollout.ignore_eos=true",
                         "trainer.total_steps=6", "rollout.gpu_memory_utilization=0.3")
    assert len(records) == 6 and all(r["staleness/max"] <= eta for r in records)
    switched = check_versions(tmp_path, eta)
    cut = sum(r["sync/cut_requests"] for r in records)
    print(f"share eta={eta}: {switched} trained samples switched weights mid-generation; {cut:.0f} requests cut "
          f"by syncs; sync medians {sorted(r['time/sync_s'] for r in records)[3]:.3f} s")
    assert cut > 0 and switched > 0, "no sync landed while requests were in flight"
    assert diff < 1e-3


def test_disaggregated_async_on_two_gpus(ray_session, tiny_model, tmp_path):
    if _gpus() < 2:
        pytest.skip("needs 2 GPUs")
    records, diff = _run("recipes/gpu_2x_async.yaml", tiny_model, tmp_path)
    assert len(records) == 4 and all(r["staleness/max"] <= 2 for r in records)
    check_versions(tmp_path, 2)
    assert diff < 1e-3
