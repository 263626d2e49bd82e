"""`streamrl submit / status / logs / stop` against a real Ray cluster started with `ray start --head`."""

import json
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
from rl.core.config import load_recipe


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


@pytest.mark.slow
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
    assert '"SUCCEEDED"' in st.stdout and json.loads(st.stdout)["run_dir"] == str(run_dir)
    assert (run_dir / "metrics.jsonl").exists()  # same machine: the job wrote where it was told

    # a second job with no run_dir: it goes under logging.cluster_run_root, printed at submit; stopped while it runs
    root = tmp_path / "cluster-runs"
    out = cli("submit", "recipes/cpu_default.yaml", f"model.path={tiny_model}", "trainer.total_steps=500",
              "logging.progress=false", f"logging.cluster_run_root={root}", "--address", cluster)
    job2 = out.stdout.split()[2]
    printed = next(line for line in out.stdout.splitlines() if "run directory" in line).split()[-1]
    assert printed.startswith(f"{root}/") and printed.endswith("-cpu-default"), out.stdout
    assert f"{cluster}/#/jobs/{job2}" in out.stdout
    assert jobs.wait_for(job2, cluster, {"RUNNING"}, timeout_s=120) == "RUNNING"
    assert jobs.status(job2, cluster)["run_dir"] == printed
    listed = cli("list", "--address", cluster)
    assert listed.returncode == 0 and job_id in listed.stdout and printed in listed.stdout
    deadline = time.monotonic() + 120  # RUNNING is the driver's start; the run directory comes with its build
    while not (Path(printed) / "config.yaml").exists():
        assert time.monotonic() < deadline, f"the job wrote no run directory at {printed}"
        time.sleep(0.5)
    stopped = cli("stop", job2, "--address", cluster, timeout=200)
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout, stopped.stderr

    # an unknown job id: one line, no traceback
    missing = cli("status", "raysubmit_no_such_job", "--address", cluster)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (f"streamrl: no job 'raysubmit_no_such_job' on the Ray cluster at {cluster}; "
                                      f"`streamrl list --address {cluster}` lists its jobs")
    for verb in (("logs",), ("logs", "--follow"), ("stop",)):
        out = cli(*verb, "raysubmit_no_such_job", "--address", cluster)
        assert out.returncode == 1 and out.stderr.startswith("streamrl: no job 'raysubmit_no_such_job'"), out.stderr


def test_submit_rejects_a_bad_recipe_before_contacting_the_cluster():
    out = cli("submit", "recipes/cpu_default.yaml", "trainer.wrld_size=2", "--address", "http://127.0.0.1:1")
    assert out.returncode == 2 and "trainer.world_size" in out.stderr


def test_unreachable_cluster_is_a_clear_error():
    out = cli("status", "raysubmit_x", "--address", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1 and "cannot reach the Ray job server" in out.stderr


@pytest.mark.parametrize("given, url, note", [
    ("http://head:8265", "http://head:8265", None),
    ("head:8265", "http://head:8265", None),
    ("https://head.example.com:443/", "https://head.example.com:443", None),
    ("head", "http://head:8265", None),
    ("head:6379", "http://head:8265", "the GCS port"),
    ("10.0.0.5:6379", "http://10.0.0.5:8265", "the GCS port"),
    ("ray://head:10001", "http://head:8265", "Ray Client's port"),
])
def test_address_in_any_form_gives_the_job_server_and_a_correct_link(given, url, note):
    got, said = jobs.job_server_address(given)
    assert got == url and (note in said if note else said is None)
    assert jobs.job_link(given, "raysubmit_1") == f"{url}/#/jobs/raysubmit_1"


def test_a_submitted_run_directory_is_never_in_rays_working_dir_copy():
    r = load_recipe(None, ["logging.name=exp"])
    assert jobs.cluster_run_dir(r).startswith("~/streamrl-runs/") and jobs.cluster_run_dir(r).endswith("-exp")
    r = load_recipe(None, ["logging.cluster_run_root=/shared/runs", "logging.run_dir=a/b"])
    assert jobs.cluster_run_dir(r) == "/shared/runs/a/b"
    r = load_recipe(None, ["logging.run_dir=/abs/run"])
    assert jobs.cluster_run_dir(r) == "/abs/run"


@pytest.mark.parametrize("env, mode", [
    ({}, None),  # no token anywhere: Ray's default
    ({"RAY_AUTH_TOKEN": "t0k"}, "token"),
    ({"RAY_AUTH_TOKEN_PATH": "/some/file"}, "token"),
    ({"HOME_TOKEN": "1"}, "token"),  # ~/.ray/auth_token
    ({"HOME_TOKEN": "1", "RAY_AUTH_MODE": "disabled"}, "disabled"),  # the user's choice is kept
])
def test_a_token_at_hand_turns_token_mode_on(env, mode, tmp_path):
    """In a process of its own: token mode, once on, stays on in Ray's config for the rest of a process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if env.pop("HOME_TOKEN", None):
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("t0k")
    code = "import os; from rl import jobs; jobs._enable_token_auth(); print(os.environ.get('RAY_AUTH_MODE'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**base, **env, "HOME": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == str(mode), out.stderr
