"""Where each step's metrics record goes: the console and metrics.jsonl always, and the trackers a recipe
turns on (TensorBoard, Weights & Biases, MLflow).

A sink is `log(step, record)` and `close(state)`; `MetricsLogger` fans every record out to its sinks.
Trackers get the record's finite numbers (a nested dict such as `staleness/hist` becomes `staleness/hist/<lag>`)
and the resolved recipe (`config.yaml` of the run) as their config / params. Each tracker runs on a thread of its
own (`ThreadedSink`), so a slow or stalled network call never holds the controller's event loop; a tracker
that fails, stalls or falls behind is reported once and the run goes on: metrics.jsonl has every step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from rl.core.config import LoggingConfig

log = logging.getLogger(__name__)

CONSOLE_KEYS = [
    ("reward/mean", "reward", "{:.3f}"), ("response/len_mean", "len", "{:.1f}"),
    ("actor/kl_behaviour", "kl", "{:.4f}"), ("actor/entropy", "ent", "{:.3f}"),
    ("throughput/samples_per_s", "samples/s", "{:.1f}"), ("staleness/mean", "stale", "{:.2f}"),
    ("time/step_s", "step_s", "{:.2f}"),
]
TRACKERS_EXTRA = "pip install 'streamrl[trackers]'"
TRACKER_QUEUE = 256  # records a tracker may fall behind by; later ones are dropped (reported once) until it catches up
TRACKER_CLOSE_TIMEOUT_S = 60.0  # the end of a run waits at most this long for a tracker to flush and finish


class Sink(Protocol):
    name: str

    def log(self, step: int, record: dict[str, Any]) -> None: ...

    def close(self, state: str) -> None: ...  # state: finished | failed | stopped


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record, nested dicts flattened one level (`staleness/hist/1`); drops
    `step` and `time`, which every tracker records on its own."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        items = [(f"{key}/{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[k] = float(v)
    return out


def recipe_values(run_dir: Path) -> dict[str, Any]:
    """The run's resolved recipe (`config.yaml`) as flat `section.key` -> value with its YAML type (W&B's config)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): tree}

    return flat(OmegaConf.to_container(OmegaConf.load(path)), "")


def recipe_params(run_dir: Path) -> dict[str, str]:
    """The recipe as flat `section.key` -> text, for trackers whose params are strings (MLflow, TensorBoard)."""
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in recipe_values(run_dir).items()}


class ThreadedSink:
    """A tracker sink on a thread of its own: `log` only queues the record (a full queue drops it, reported
    once), `close` waits at most `close_timeout_s` for the queue to drain and the tracker to finish, then
    leaves a stalled one behind (a daemon thread). A tracker that raises is reported once and dropped."""

    def __init__(self, sink: Sink, queue_size: int | None = None, close_timeout_s: float | None = None) -> None:
        self.sink, self.name = sink, sink.name
        self.close_timeout_s = TRACKER_CLOSE_TIMEOUT_S if close_timeout_s is None else close_timeout_s
        self.queue: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue(maxsize=queue_size or TRACKER_QUEUE)
        self.failed = False
        self.reported: set[str] = set()
        self.thread = threading.Thread(target=self._work, name=f"tracker-{self.name}", daemon=True)
        self.thread.start()

    def log(self, step: int, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self.queue.put_nowait(("log", (step, dict(record))))
        except queue.Full:
            self._report("behind", f"metrics sink {self.name} is {self.queue.qsize()} records behind (stalled or "
                                   f"slow); dropping its records from step {step} until it catches up "
                                   "(metrics.jsonl has every step)")

    def close(self, state: str) -> None:
        deadline = time.monotonic() + self.close_timeout_s
        try:
            self.queue.put(("close", (state,)), timeout=self.close_timeout_s)
        except queue.Full:
            pass
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            self._report("close", f"metrics sink {self.name} did not flush and finish within "
                                  f"{self.close_timeout_s:.0f} s; left behind (metrics.jsonl has every step)")

    def _work(self) -> None:
        while True:
            method, args = self.queue.get()
            if not self.failed:
                try:
                    getattr(self.sink, method)(*args)
                except Exception as exc:
                    self.failed = True
                    self._report("failed", f"metrics sink {self.name} failed in {method} ({type(exc).__name__}: "
                                           f"{exc}); dropped for the rest of the run (metrics.jsonl has every step)")
            if method == "close":
                return

    def _report(self, what: str, text: str) -> None:
        if what not in self.reported:
            self.reported.add(what)
            log.warning("%s", text)


class ConsoleSink:
    """A progress bar and one line a step with the figures a person watches."""

    name = "console"

    def __init__(self, total_steps: int, start_step: int, progress: bool) -> None:
        self.bar = tqdm(total=total_steps, initial=start_step, desc="RL steps", disable=not progress,
                        dynamic_ncols=True)

    def write(self, text: str) -> None:
        """Print a line above the bar (the dashboard URL, for one)."""
        self.bar.write(text)

    def log(self, step: int, record: dict[str, Any]) -> None:
        parts = [f"step {step:>4}"]
        for key, label, fmt in CONSOLE_KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                parts.append(f"{label} {fmt.format(value)}")
        self.bar.write("  ".join(parts))
        self.bar.set_postfix(reward=f"{record.get('reward/mean', float('nan')):.3f}")
        self.bar.update(1)

    def close(self, state: str) -> None:
        self.bar.close()


class JsonlSink:
    """metrics.jsonl: one JSON record a line, flushed every step (the dashboard tails this file)."""

    name = "jsonl"

    def __init__(self, run_dir: Path) -> None:
        self.file = open(run_dir / "metrics.jsonl", "a")

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, default=_jsonable) + "\n")
        self.file.flush()

    def close(self, state: str) -> None:
        self.file.close()


class TensorBoardSink:
    """Scalars to event files in <run_dir>/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=10)
        params = recipe_params(run_dir)
        if params:
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("recipe", "| key | value |\n|---|---|\n" + table, 0)

    def log(self, step: int, record: dict[str, Any]) -> None:
        wall = record.get("time", time.time())
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step, walltime=wall)

    def close(self, state: str) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run (files under <run_dir>/wandb); offline mode needs no network, `wandb sync` uploads later."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: LoggingConfig) -> None:
        import wandb

        mode = cfg.wandb_mode or os.environ.get("WANDB_MODE") or "offline"  # the recipe, else W&B's own variable
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.name, dir=str(run_dir), mode=mode,
                              config=recipe_values(run_dir), reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, step: int, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=step)

    def close(self, state: str) -> None:
        import wandb

        self.run.finish(exit_code=0 if state == "finished" else 1)
        # finish() returns before the wandb-core service has flushed the run file; teardown waits for the
        # service to exit, so the run's files are complete once the run is over (`wandb sync` right after)
        wandb.teardown()


class MlflowSink:
    """An MLflow run: metrics per step, the recipe as params; a file store in <run_dir>/mlruns by default."""

    name = "mlflow"
    KEY_CHARS = re.compile(r"[^\w\-. :/]")  # MLflow's allowed key characters

    def __init__(self, run_dir: Path, cfg: LoggingConfig) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store only behind this switch; it is the one store that needs no server
            # and no database driver (mlflow-skinny has none), which is what a run directory wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.mlflow_experiment)
        self.run_id = self.client.create_run(exp_id, run_name=cfg.name).info.run_id
        params = [Param(k[:250], v[:6000]) for k, v in recipe_params(run_dir).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ms = int(record.get("time", time.time()) * 1000)
        metrics = [Metric(self.KEY_CHARS.sub("_", k), v, ms, step) for k, v in scalars(record).items()]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def close(self, state: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "failed": "FAILED"}.get(state, "KILLED"))


def _need(module: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"Recipe key '{key}' = true needs the Python package '{module}': {TRACKERS_EXTRA}")


def make_sinks(run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int) -> list[Sink]:
    """The console, metrics.jsonl (unless `logging.jsonl` is false) and each tracker the recipe turns on, each
    tracker on its own thread (`ThreadedSink`; built here, so a bad setting fails the run at its start)."""
    sinks: list[Sink] = [ConsoleSink(total_steps, start_step, cfg.progress)]
    if cfg.jsonl:
        sinks.append(JsonlSink(run_dir))
    trackers = [(cfg.tensorboard, "tensorboard", "logging.tensorboard", lambda: TensorBoardSink(run_dir)),
                (cfg.wandb, "wandb", "logging.wandb", lambda: WandbSink(run_dir, cfg)),
                (cfg.mlflow, "mlflow", "logging.mlflow", lambda: MlflowSink(run_dir, cfg))]
    for on, module, key, make in trackers:
        if on:
            _need(module, key)
            sinks.append(ThreadedSink(make()))
    return sinks


def _jsonable(x: Any) -> Any:
    return float(x) if hasattr(x, "__float__") else str(x)
