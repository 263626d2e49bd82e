"""`streamrl submit / status / logs / stop` against a real Ray cluster started with `ray start --head`."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl import jobs

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of its own (own ports, own temp dir), stopped at the end by signalling its process."""
    tmp = Path(f"/tmp/srl-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    gcs, dash = free_port(), free_port()
    # every port of its own: another Ray on this machine (the session's, a neighbour's) holds the defaults
    ports = {flag: free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port",
                                            "node-manager-port", "object-manager-port")}
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(
        [shutil.which("ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=8", f"--temp-dir={tmp}", "--include-dashboard=true",
         *[f"--{flag}={port}" for flag, port in ports.items()]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            jobs._client(address).list_jobs()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"ray start --head did not come up at {address}")
            time.sleep(2)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_submit_status_logs_and_stop(cluster, tiny_model, tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text("def score(sample):\n    return float(sample.response.strip() == sample.row['answer'])\n")
    run_dir = tmp_path / "job-run"
    out = cli("submit", "recipes/cpu_default.yaml", f"model.path={tiny_model}", f"reward.fn={reward}:score",
              "trainer.total_steps=2", "trainer.batch_groups=2", "rollout.group_size=2", "logging.progress=false",
              f"logging.run_dir={run_dir}", "--address", cluster)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.split()[2]
    final = jobs.wait_for(job_id, cluster, {"SUCCEEDED"}, timeout_s=420)
    log_text = cli("logs", job_id, "--address", cluster).stdout
    assert final == "SUCCEEDED", log_text[-3000:]
    assert "run directory" in log_text and "step    1" in log_text
    st = cli("status", job_id, "--address", cluster)
    assert '"SUCCEEDED"' in st.stdout
    assert (run_dir / "metrics.jsonl").exists()  # same machine: the job wrote where it was told

    # a second job, stopped while it runs
    out = cli("submit", "recipes/cpu_default.yaml", f"model.path={tiny_model}", "trainer.total_steps=500",
              "logging.progress=false", f"logging.run_dir={tmp_path / 'job-2'}", "--address", cluster)
    job2 = out.stdout.split()[2]
    assert jobs.wait_for(job2, cluster, {"RUNNING"}, timeout_s=120) == "RUNNING"
    stopped = cli("stop", job2, "--address", cluster, timeout=200)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stderr


def test_submit_rejects_a_bad_recipe_before_contacting_the_cluster():
    out = cli("submit", "recipes/cpu_default.yaml", "trainer.wrld_size=2", "--address", "http://127.0.0.1:1")
    assert out.returncode == 2 and "trainer.world_size" in out.stderr


def test_unreachable_cluster_is_a_clear_error():
    out = cli("status", "raysubmit_x", "--address", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cannot reach the Ray job server" in out.stderr
