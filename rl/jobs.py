"""Ray Jobs: submit a recipe to a cluster, and follow, inspect or stop the job.

`submit` validates the recipe here first (a bad key fails on the laptop, not after the cluster spun up),
writes the fully resolved recipe into a small working directory with the user's reward / agent module
files, rewrites their paths to the shipped copies, and submits `streamrl run recipe.yaml` through Ray's
Job Submission API. streamrl itself must be installed on the cluster's nodes.

Ray 2.60 clusters use token authentication: when `~/.ray/auth_token` exists (written by `ray start`) and
no RAY_AUTH_* variable is set, the client turns token mode on by itself.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rl.config import Recipe, load_recipe, to_yaml

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120.0


def _client(address: str):
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        if (Path.home() / ".ray" / "auth_token").exists():
            os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise ConnectionError(f"cannot reach the Ray job server at {address}: {exc}. Is the cluster up "
                              f"(`ray start --head`) and is this the dashboard address (default port 8265)?") from exc


def _ship(spec: str | None, workdir: Path, key: str) -> str | None:
    """Copy a `file.py:function` plugin into the job's working dir; return the spec to use there."""
    if not spec:
        return spec
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        src = Path(target).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"{key} = {spec!r}: {src} not found")
        dst = workdir / "plugins" / src.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
        return f"plugins/{src.name}:{name}"
    module_file = Path(*target.split(".")).with_suffix(".py")
    if module_file.exists():  # a module of the user's current directory, not an installed package
        dst = workdir / module_file
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(module_file, dst)
    return spec


def prepare(recipe: Recipe, workdir: Path) -> Path:
    """Write the job's working directory; returns the recipe path inside it."""
    recipe.reward.fn = _ship(recipe.reward.fn, workdir, "reward.fn") or recipe.reward.fn
    recipe.rollout.agent.fn = _ship(recipe.rollout.agent.fn, workdir, "rollout.agent.fn")
    for attr in ("source",):
        src = getattr(recipe.data, attr)
        if not src.startswith("synthetic:") and Path(src).expanduser().exists():
            dst = workdir / "data" / Path(src).name
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(Path(src).expanduser(), dst)
            setattr(recipe.data, attr, f"data/{Path(src).name}")
    path = workdir / "recipe.yaml"
    path.write_text(to_yaml(recipe))
    return path


def submit(recipe_path: str, overrides: list[str], address: str, name: str | None = None) -> str:
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe fails here, before the cluster is touched
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="streamrl-job-") as tmp:
        work = Path(tmp)
        prepare(recipe, work)
        kwargs = dict(
            entrypoint="streamrl run recipe.yaml",
            runtime_env={"working_dir": str(work),
                         "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}},
            metadata={"streamrl_recipe": Path(recipe_path).name, "name": name or recipe.logging.name},
        )
        t0 = time.monotonic()
        while True:
            try:
                return client.submit_job(**kwargs)
            except RuntimeError as exc:  # a head node that just started has no job agent for a few seconds
                if "No available agent" not in str(exc) or time.monotonic() - t0 > AGENT_WAIT_S:
                    raise
                time.sleep(2.0)


def status(job_id: str, address: str) -> dict[str, Any]:
    info = _client(address).get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "entrypoint": info.entrypoint}


def logs(job_id: str, address: str, follow: bool = False) -> str:
    client = _client(address)
    if not follow:
        return client.get_job_logs(job_id)
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return ""


def stop(job_id: str, address: str) -> bool:
    return bool(_client(address).stop_job(job_id))


def wait_for(job_id: str, address: str, statuses: set[str], timeout_s: float) -> str:
    """Poll until the job reaches one of `statuses` (or a terminal one); raises TimeoutError naming both."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        last = status(job_id, address)["status"]
        if last in statuses or last in TERMINAL:
            return last
        time.sleep(1.0)
    raise TimeoutError(f"Timed out after {timeout_s:.0f} s waiting for job {job_id} at {address} to reach "
                       f"{sorted(statuses)}; it is {last}")
