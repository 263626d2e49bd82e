"""The soak benchmark's arithmetic and process naming (rl/bench/soak.py); the soak itself is a bench, not a test."""

import subprocess
import sys
import time

import pytest

from rl.bench.soak import kind, sample_rss, slope_per_10min, step_rate


def test_growth_is_the_least_squares_slope_per_ten_minutes():
    ts = [0, 60, 120, 180]
    assert slope_per_10min(ts, [100 + 0.5 * t / 60 for t in ts]) == pytest.approx(5.0)  # 0.5 MB a minute
    assert slope_per_10min(ts, [7, 9, 7, 9]) == pytest.approx(600 * 2 * 60 / 18000)  # noise: a small slope
    assert slope_per_10min([0], [1]) == 0.0 and slope_per_10min([5, 5], [1, 2]) == 0.0


@pytest.mark.parametrize("cmdline,name,expected", [
    (["ray::RolloutWorker.generate_group"], "ray::RolloutWo", "ray::RolloutWorker"),
    (["/x/ray/core/src/ray/gcs/gcs_server", "--port"], "gcs_server", "gcs_server"),
    (["/x/raylet/raylet", "--node"], "raylet", "raylet"),
    (["VLLM::EngineCore"], "VLLM::EngineCor", "VLLM::EngineCore"),
    (["python", "-c", "from multiprocessing.spawn import spawn_main"], "python", "python (multiprocessing child)"),
    (["python", "-c", "from multiprocessing.resource_tracker import main;main(68)"], "python",
     "python (multiprocessing resource tracker)"),
    # Ray's agents before they rename themselves: their arguments name the raylet, they are not the raylet
    (["/v/bin/python", "-u", "/v/ray/dashboard/agent.py", "--raylet-name=/tmp/ray/s/sockets/raylet"], "python",
     "dashboard_agent"),
    (["/v/bin/python", "-u", "/v/ray/_private/runtime_env/agent/main.py", "--raylet-name=/r/raylet"], "python",
     "runtime_env_agent"),
    (["/v/bin/python", "/v/ray/dashboard/dashboard.py", "--host=127.0.0.1"], "python", "dashboard (Ray head)"),
    (["/v/bin/python", "-u", "/v/ray/_private/log_monitor.py", "--gcs-address=x"], "python", "log_monitor"),
])
def test_processes_are_named_by_kind(cmdline, name, expected):
    assert kind(cmdline, name) == expected


def test_rss_is_sampled_for_the_driver_and_what_it_started():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        rss = sample_rss(child.pid)
        assert set(rss) == {"driver (streamrl run)"} and rss["driver (streamrl run)"] > 1
    finally:
        child.kill()
        child.wait()
    assert sample_rss(child.pid) == {}  # a process gone is no error


def test_step_rate_is_read_from_metrics_jsonl(tmp_path):
    assert step_rate(tmp_path) == (0, 0.0)  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "time": {100 + 0.5 * s}}}\n' for s in range(5)))
    assert step_rate(tmp_path) == (5, pytest.approx(2.0))
