"""Ray Jobs: submit a recipe to a cluster, and list, follow, inspect or stop its jobs.

`submit` validates the recipe here first (a bad key fails on the laptop, not after the cluster spun up),
runs the preflight checks this machine can answer (rl/preflight.py), writes the fully resolved recipe into
a small working directory with the user's reward / agent module files and data file, rewrites their paths
to the shipped copies, and submits `streamrl run recipe.yaml` through Ray's Job Submission API. streamrl
itself must be installed on the cluster's nodes.

Ray's working directory of a job is a temporary copy, so the run directory is never put there: it goes to
`logging.cluster_run_root` (default ~/streamrl-runs on the head node, where a job's driver runs), stored in
the job's metadata so `streamrl status` and `streamrl list` show it.

`--address` takes the job server (dashboard) URL, http://HEAD:8265; HEAD:6379 (the GCS port) and
ray://HEAD:10001 (Ray Client) are mapped to it with a note.

Token authentication (Ray 2.60): when RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, written by `ray get-auth-token --generate`), the
client is put in token mode, so Ray's SDK sends the token as an `Authorization: Bearer` header.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from rl.core.config import Recipe, load_recipe, to_yaml

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120.0
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6379, 8265, 10001  # Ray's default ports
RUN_DIR_KEY = "streamrl_run_dir"  # job metadata: where the job writes its run directory
T = TypeVar("T")


class JobNotFoundError(LookupError):
    """No job of that id on the cluster (Ray's job server answered 404)."""


@dataclass
class Submitted:
    job_id: str
    address: str  # the job server it went to
    run_dir: str  # on the node that runs the job's driver

    @property
    def dashboard_link(self) -> str:
        return job_link(self.address, self.job_id)


def job_server_address(address: str) -> tuple[str, str | None]:
    """The job server URL for any form of a cluster address, and a note when it was changed.

    HEAD:8265 or http(s)://HEAD:PORT is kept (scheme added); HEAD:6379 (the GCS port that `ray start` prints)
    and ray://HEAD:10001 (Ray Client) become http://HEAD:8265, the dashboard's default port."""
    given = address.strip().rstrip("/")
    url = given if "://" in given else f"http://{given}"
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    scheme = parts.scheme
    if scheme == "ray" or port in (GCS_PORT, CLIENT_PORT):
        what = "Ray Client's port" if scheme == "ray" or port == CLIENT_PORT else "the GCS port"
        fixed = f"http://{host}:{DASHBOARD_PORT}"
        return fixed, (f"--address {address} is {what}; jobs go to the job server on the dashboard port: using {fixed} "
                       f"(pass --address http://HEAD:PORT if the dashboard listens on another port)")
    if scheme not in ("http", "https"):
        raise ConnectionError(f"--address {address}: use the Ray dashboard's URL, e.g. http://HEAD:{DASHBOARD_PORT}")
    host_part = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host_part}:{port or DASHBOARD_PORT}", None


def job_link(address: str, job_id: str) -> str:
    """The job's page in Ray's dashboard."""
    return f"{job_server_address(address)[0]}/#/jobs/{job_id}"


def _enable_token_auth() -> None:
    """Token mode for Ray's client when a token is at hand and the user did not choose a mode (Ray 2.60 reads
    the token from RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, only in token mode)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
        if "ray._raylet" in sys.modules:  # Ray read its config at import: re-read it, as Ray does when it turns token mode on
            from ray._raylet import Config

            Config.initialize("")


def _client(address: str):
    _enable_token_auth()
    from ray.job_submission import JobSubmissionClient

    url = job_server_address(address)[0]
    try:
        return JobSubmissionClient(url)
    except Exception as exc:
        raise ConnectionError(f"cannot reach the Ray job server at {url}: {_first_line(exc)}. Is the cluster up "
                              f"(`ray start --head`) and is this the dashboard address (default port {DASHBOARD_PORT}, "
                              f"not the GCS port {GCS_PORT})?") from exc


def _request(job_id: str, address: str, call: Callable[[Any], T]) -> T:
    """`call(client)`, with Ray's 404 for an unknown job and its authentication errors as one-line errors."""
    from ray.exceptions import AuthenticationError

    client = _client(address)
    try:
        return call(client)
    except AuthenticationError as exc:
        raise PermissionError(f"the Ray cluster at {address} refused the request ({_first_line(exc)}): it uses token "
                              "authentication; put its token in ~/.ray/auth_token or RAY_AUTH_TOKEN (README, "
                              "'Token authentication')") from None
    except RuntimeError as exc:
        if job_id and ("status code 404" in str(exc) or "does not exist" in str(exc)):
            raise JobNotFoundError(f"no job {job_id!r} on the Ray cluster at {address}; `streamrl list --address "
                                   f"{address}` lists its jobs") from None
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


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


def cluster_run_dir(recipe: Recipe) -> str:
    """Where a submitted run writes: an absolute (or ~) `logging.run_dir` as is, else under
    `logging.cluster_run_root` (a relative run_dir, or <date>-<time>-<name>). Never Ray's temporary copy of the
    working directory, which the user cannot find and Ray deletes."""
    given, root = recipe.logging.run_dir, recipe.logging.cluster_run_root.rstrip("/")
    if given.startswith(("/", "~")):
        return given
    return f"{root}/{given or time.strftime('%Y%m%d-%H%M%S') + '-' + recipe.logging.name}"


def submit(recipe_path: str, overrides: list[str], address: str, name: str | None = None) -> Submitted:
    from rl.preflight import preflight

    recipe = load_recipe(recipe_path, overrides)  # a bad recipe fails here, before the cluster is touched
    preflight(recipe, on_cluster=True)
    recipe.logging.run_dir = cluster_run_dir(recipe)
    url = job_server_address(address)[0]
    _client(url)  # an unreachable cluster fails before the working directory is written
    with tempfile.TemporaryDirectory(prefix="streamrl-job-") as tmp:
        work = Path(tmp)
        prepare(recipe, work)
        kwargs = dict(
            entrypoint="streamrl run recipe.yaml",
            runtime_env={"working_dir": str(work),
                         "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}},
            metadata={"streamrl_recipe": Path(recipe_path).name, "name": name or recipe.logging.name,
                      RUN_DIR_KEY: recipe.logging.run_dir},
        )
        t0 = time.monotonic()
        while True:
            try:
                job_id = _request("", url, lambda c: c.submit_job(**kwargs))
                return Submitted(job_id, url, recipe.logging.run_dir)
            except RuntimeError as exc:  # a head node that just started has no job agent for a few seconds
                if "No available agent" not in str(exc) or time.monotonic() - t0 > AGENT_WAIT_S:
                    raise
                time.sleep(2.0)


def status(job_id: str, address: str) -> dict[str, Any]:
    info = _request(job_id, address, lambda c: c.get_job_info(job_id))
    return {"job_id": job_id, "status": _status_name(info.status), "message": info.message,
            "run_dir": (info.metadata or {}).get(RUN_DIR_KEY), "dashboard": job_link(address, job_id),
            "entrypoint": info.entrypoint}


def list_jobs(address: str) -> list[dict[str, Any]]:
    """Every job the cluster knows, oldest first: id, status, name, start time, run directory."""
    jobs = _request("", address, lambda c: c.list_jobs())
    rows = []
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        meta = job.metadata or {}
        rows.append({"job_id": job.submission_id or job.job_id, "status": _status_name(job.status),
                     "name": meta.get("name", ""), "started": _clock(job.start_time),
                     "run_dir": meta.get(RUN_DIR_KEY, "")})
    return rows


def _status_name(value: Any) -> str:
    return str(value.value if hasattr(value, "value") else value)


def _clock(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else ""


def logs(job_id: str, address: str, follow: bool = False) -> str:
    if not follow:
        return _request(job_id, address, lambda c: c.get_job_logs(job_id))
    _request(job_id, address, lambda c: c.get_job_info(job_id))  # an unknown id fails here, as one line
    client = _client(address)
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return ""


def stop(job_id: str, address: str) -> bool:
    return bool(_request(job_id, address, lambda c: c.stop_job(job_id)))


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
