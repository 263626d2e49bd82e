"""`streamrl bench vs-trl` on CPU: TRL's GRPOTrainer and streamrl run the same workload in child processes,
and the figures are computed the same way for both (the timings themselves are not checked)."""

import json
import subprocess
import sys

import pytest

from rl.bench import time_to_reward
from rl.bench.vs_trl import summarize


def test_figures_use_one_clock_for_every_system():
    res = {"system": "x", "samples_per_step": 128, "start_time": 100.0, "step_end_times": [101.0, 102.0, 104.0, 106.0],
           "rewards": [0.1, 0.3, 0.5, 0.7], "completion_len": [10.0, 10.0, 20.0, 20.0]}
    out = summarize(res, warmup=2, target=0.5, window=2)
    assert out["s_per_step"] == pytest.approx(2.0)  # steps 3 and 4: from 102 to 106
    assert out["samples_per_s"] == pytest.approx(64.0)
    assert out["tokens_per_s"] == pytest.approx(64.0 * 20)
    assert out["time_to_reward_s"] == pytest.approx(6.0)  # the 2-step mean first reaches 0.5 at step 4 (0.6)
    assert time_to_reward([0.1, 0.2], [1.0, 2.0], 0.0, 0.5, 10) is None
    assert "error" in summarize({**res, "step_end_times": [101.0]}, warmup=2, target=0.5, window=2)


@pytest.mark.slow
def test_vs_trl_runs_both_systems_on_cpu(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "vs_trl.json"
    proc = subprocess.run([sys.executable, "-m", "rl.cli", "bench", "vs-trl", "--device", "cpu", "--steps", "6",
                           "--warmup", "2", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == res  # the last line is the JSON
    assert set(res["systems"]) == {"trl", "separate-eta1"}
    for name, r in res["systems"].items():
        assert "error" not in r, (name, r)
        assert r["steps"] == 6 and r["samples_per_step"] == 128
        assert r["samples_per_s"] > 0 and r["completion_len_mean"] > 0
    assert res["ratios"]["separate-eta1_over_trl"] == pytest.approx(
        res["systems"]["separate-eta1"]["samples_per_s"] / res["systems"]["trl"]["samples_per_s"])
