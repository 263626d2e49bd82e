"""The `streamrl` command: run | resume | submit | status | logs | stop | dashboard | make-model | bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rl.config import RecipeError, load_recipe


def _cmd_run(args: argparse.Namespace) -> int:
    from rl.controller import Controller

    recipe = load_recipe(args.recipe, args.overrides)  # fails before any actor starts
    return _run(Controller(recipe, Path(args.run_dir) if args.run_dir else None))


def _cmd_resume(args: argparse.Namespace) -> int:
    from rl.controller import Controller

    return _run(Controller.from_run_dir(Path(args.run_dir), args.overrides))


def _run(ctl) -> int:
    """Build, run, tear down, then print where the run is and how reward moved (over the whole run).
    Ctrl-C or SIGTERM stops the run cleanly: the loop's stages stop, the trainer finishes any checkpoint
    write, and the command to resume is printed (rc 130 / 143, no traceback)."""
    from rl.metrics import learning_summary, read_metrics
    from trainer.checkpoint import UnsafeCheckpoint

    stop = SignalStop()
    try:
        try:
            ctl.build()
            ctl.run()
        finally:
            ctl.shutdown()
    except KeyboardInterrupt:
        print(stop.report(ctl.run_dir), file=sys.stderr, flush=True)
        return stop.exit_code()
    except UnsafeCheckpoint as exc:
        print(f"streamrl: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.restore()
    summary = learning_summary(read_metrics(ctl.run_dir))
    print(f"\nrun directory: {ctl.run_dir}" + (f" (resumed at step {ctl.start_step})" if ctl.resume else ""))
    if summary:
        print(f"reward: first 10% of steps {summary['first10']:.3f} -> last 10% {summary['last10']:.3f} "
              f"(gain {summary['gain']:+.3f} over {summary['steps']} steps)")
    return 0


class SignalStop:
    """SIGTERM stops a run the way Ctrl-C does: it calls the SIGINT handler in force (asyncio's while the
    loop runs, which cancels the loop's main task so its `finally` blocks run; otherwise Python's, which
    raises KeyboardInterrupt). Remembers a SIGTERM for the exit code (128 + the signal's number)."""

    def __init__(self) -> None:
        import threading

        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # only there can Python set a handler
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.signum = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored or left to the OS: still stop
            raise KeyboardInterrupt

    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def report(self, run_dir: Path) -> str:
        from rl.metrics import read_metrics
        from trainer.checkpoint import latest_checkpoint

        name = signal.Signals(self.signum or signal.SIGINT).name
        steps = len(read_metrics(run_dir)) if Path(run_dir).is_dir() else 0
        ckpt = latest_checkpoint(run_dir)
        where = (f"continue it from {ckpt.name}: streamrl resume {run_dir}" if ckpt is not None else
                 "it has no checkpoint yet, so it cannot be resumed (set trainer.checkpoint_every to make one)")
        return f"\nstreamrl: stopped by {name} after {steps} steps; run directory {run_dir}; {where}"

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _cmd_make_model(args: argparse.Namespace) -> int:
    from rl.data import synthetic_task
    from rl.models import make_tiny_model

    recipe = load_recipe(args.recipe, args.overrides)
    task = synthetic_task(recipe.data)
    if task is None:
        raise RecipeError("make-model builds a model for a synthetic task: set data.source=synthetic:NAME")
    path = make_tiny_model(recipe.model.tiny, task, recipe.model.cache_dir)
    print(json.dumps({"model_dir": str(path), **json.loads((path / "streamrl_model.json").read_text())}, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rl.bench import main as bench_main

    return bench_main(args.name, args.bench_args)


def _cmd_submit(args: argparse.Namespace) -> int:
    from rl import jobs

    job_id = jobs.submit(args.recipe, args.overrides, args.address, args.name)
    print(f"submitted job {job_id} to {args.address}")
    print(f"  follow it:   streamrl logs {job_id} --address {args.address} --follow")
    print(f"  its status:  streamrl status {job_id} --address {args.address}")
    print(f"  Ray dashboard: {args.address}/#/jobs/{job_id}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from rl import jobs

    print(json.dumps(jobs.status(args.job_id, args.address), indent=2))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from rl import jobs

    text = jobs.logs(args.job_id, args.address, follow=args.follow)
    if text:
        print(text, end="")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from rl import jobs

    jobs.stop(args.job_id, args.address)
    final = jobs.wait_for(args.job_id, args.address, {"STOPPED"}, timeout_s=args.timeout)
    print(f"job {args.job_id}: {final}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from rl.dashboard import DashboardServer

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not any((run_dir / name).exists() for name in ("metrics.jsonl", "status.json", "timeline.jsonl")):
        print(f"streamrl: {run_dir} has no metrics.jsonl, status.json or timeline.jsonl yet; serving it anyway "
              "(the page fills in as a run writes them)", file=sys.stderr)
    try:
        server = DashboardServer(run_dir, args.host, args.port)
    except OSError as exc:
        raise ConnectionError(f"cannot listen on {args.host}:{args.port} ({exc}); pick another --port (0: any free one)")
    print(f"dashboard of {run_dir}: {server.url}  (Ctrl-C stops it)", flush=True)
    server.serve_forever()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamrl", description="Asynchronous RL post-training for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe on this machine (or the Ray cluster in resources.ray_address)")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.world_size=2")
    run.add_argument("--run-dir", default=None, help="a new run directory; one that holds a run is refused (streamrl resume it) "
                     "(default: logging.run_dir or runs/<time>-<name>)")
    run.set_defaults(fn=_cmd_run)

    rs = sub.add_parser("resume", help="continue a killed run from its last checkpoint (needs trainer.checkpoint_every) "
                                       "and its data store log")
    rs.add_argument("run_dir")
    rs.add_argument("overrides", nargs="*", help="key=value overrides on top of the run's saved recipe")
    rs.set_defaults(fn=_cmd_resume)

    mk = sub.add_parser("make-model", help="build (or find in the cache) the warm-started tiny model of a recipe")
    mk.add_argument("recipe", nargs="?", default=None, help="recipe YAML (default: the schema defaults)")
    mk.add_argument("overrides", nargs="*")
    mk.set_defaults(fn=_cmd_make_model)

    addr = {"default": os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
            "help": "the cluster's job server (dashboard) address, e.g. http://HEAD:8265"}
    sb = sub.add_parser("submit", help="submit a recipe to a Ray cluster as a Ray job")
    sb.add_argument("recipe")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--address", **addr)
    sb.add_argument("--name", default=None, help="a name stored with the job")
    sb.set_defaults(fn=_cmd_submit)
    for verb, fn, text in (("status", _cmd_status, "a job's status"), ("logs", _cmd_logs, "a job's logs"),
                           ("stop", _cmd_stop, "stop a job")):
        sp = sub.add_parser(verb, help=text)
        sp.add_argument("job_id")
        sp.add_argument("--address", **addr)
        if verb == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if verb == "stop":
            sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for STOPPED")
        sp.set_defaults(fn=fn)

    dash = sub.add_parser("dashboard", help="serve the dashboard of a run directory (finished or running)")
    dash.add_argument("run_dir", help="the run directory (holds metrics.jsonl, timeline.jsonl, status.json)")
    dash.add_argument("--port", type=int, default=8266, help="port to listen on; 0 picks a free one")
    dash.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for other machines")
    dash.set_defaults(fn=_cmd_dashboard)

    bench = sub.add_parser("bench", help="run a benchmark: prints a table and one JSON line (see rl/bench)")
    bench.add_argument("name", help="benchmark name, e.g. datastore")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options (--help for them)")
    bench.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except RecipeError as exc:
        print(f"streamrl: recipe error: {exc}", file=sys.stderr)
        return 2
    except (ConnectionError, FileExistsError, FileNotFoundError, TimeoutError) as exc:
        print(f"streamrl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
