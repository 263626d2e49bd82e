"""The `streamrl` command: run | resume | config | submit | list | status | logs | stop | dashboard | make-model | bench.

Every user-facing failure is one line on stderr (several for several preflight problems) and an exit code:
2 for a recipe, a check or the command line, 1 for the cluster, the files or a timeout.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from rl.core.config import RecipeError, load_recipe, resolve_run_dir, to_yaml

log = logging.getLogger("streamrl")


def _cmd_run(args: argparse.Namespace) -> int:
    from rl.preflight import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    checked = preflight(recipe)  # fails here, before Ray or any actor starts
    if args.dry_run:
        return _dry_run_report(args.recipe, checked, Path(args.run_dir) if args.run_dir else resolve_run_dir(recipe))
    from rl.controller import Controller

    return _run(Controller(recipe, Path(args.run_dir) if args.run_dir else None))


def _cmd_resume(args: argparse.Namespace) -> int:
    from rl.controller import Controller
    from rl.preflight import preflight

    ctl = Controller.from_run_dir(Path(args.run_dir), args.overrides)
    checked = preflight(ctl.recipe)
    if args.dry_run:
        return _dry_run_report(str(Path(args.run_dir) / "config.yaml"), checked, ctl.run_dir)
    return _run(ctl)


def _dry_run_report(origin: str | None, checked: list[str], run_dir: Path) -> int:
    print(f"dry run: {origin or 'the schema defaults'} loads and passes the checks; nothing was started")
    for line in checked:
        print(f"  {line}")
    print(f"  run directory: {run_dir}")
    return 0


def _run(ctl) -> int:
    """Build, run, tear down, then print where the run is and how reward moved (over the whole run).
    Ctrl-C or SIGTERM stops the run cleanly: the loop's stages stop, the trainer finishes any checkpoint
    write, and the command to resume is printed (rc 130 / 143, no traceback)."""
    from rl.metrics import learning_summary, read_metrics
    from trainer.checkpoint import UnsafeCheckpoint

    from rl.recovery import run_with_restarts

    stop = SignalStop()
    try:
        ctl = run_with_restarts(ctl)  # a dead trainer rank or storage unit: goes on from the last checkpoint
    except KeyboardInterrupt:
        print(stop.report(ctl.run_dir), file=sys.stderr, flush=True)
        return stop.exit_code()
    except UnsafeCheckpoint as exc:
        print(f"streamrl: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.restore()
    summary = learning_summary(read_metrics(ctl.run_dir))
    from rl.recovery import read_restarts

    restarts = read_restarts(ctl.run_dir)
    print(f"\nrun directory: {ctl.run_dir}" + (f" (resumed at step {ctl.start_step})" if ctl.resume else "")
          + (f"; restarted {len(restarts)} time(s) from a checkpoint after a fault ({ctl.run_dir / 'restarts.jsonl'})"
             if restarts else ""))
    if summary:
        print(f"reward: first 10% of steps {summary['first10']:.3f} -> last 10% {summary['last10']:.3f} "
              f"(gain {summary['gain']:+.3f} over {summary['steps']} steps)")
    if "eval" in summary:
        e = summary["eval"]
        print(f"held-out eval reward: {e['first']:.3f} at version {e['first_version']} -> {e['last']:.3f} at version "
              f"{e['last_version']} (gain {e['gain']:+.3f}; samples in {ctl.run_dir / 'eval'})")
    return 0


def _recipe_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """An optional recipe before key=value overrides: `streamrl config a.b=1` has no recipe file."""
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, overrides


def _cmd_config(args: argparse.Namespace) -> int:
    recipe, overrides = _recipe_args(args)
    print(to_yaml(load_recipe(recipe, overrides)), end="")
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
    from rl.core.config import DataConfig
    from rl.data import synthetic_task
    from rl.models import make_tiny_model

    recipe = load_recipe(*_recipe_args(args))
    task = synthetic_task(recipe.data)
    if task is None:  # file data: the tiny model is still warm-started on the synthetic task of the defaults
        task = synthetic_task(DataConfig())
        print(f"streamrl: data.source = {recipe.data.source!r} is a file: the tiny model is warm-started on "
              f"{DataConfig().source}", file=sys.stderr)
    path = make_tiny_model(recipe.model.tiny, task, recipe.model.cache_dir)
    info = json.loads((path / "streamrl_model.json").read_text())
    print(f"tiny model ({info['spec']['arch']}, task {info['task']['name']}): {path}")
    print("pass it to a run (required with file data):")
    print(f"model.path={path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rl.bench import available
    from rl.bench import main as bench_main

    if args.list or not args.name:
        for name in available():
            print(f"{name:14s} {_bench_summary(name)}")
        return 0
    return bench_main(args.name, args.bench_args)


def _bench_summary(name: str) -> str:
    """The first line of a benchmark module's docstring, read without importing it (some import vLLM)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(f"rl.bench.{name.replace('-', '_')}")
    if spec is None or not spec.origin:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    return doc.splitlines()[0] if doc else ""


def _address(args: argparse.Namespace) -> str:
    """The job server URL for --address in any form; a changed address is said once, on stderr."""
    from rl import jobs

    url, note = jobs.job_server_address(args.address)
    if note:
        print(f"streamrl: {note}", file=sys.stderr)
    return url


def _cmd_submit(args: argparse.Namespace) -> int:
    from rl import jobs

    address = _address(args)
    job = jobs.submit(args.recipe, args.overrides, address, args.name)
    print(f"submitted job {job.job_id} to {address}")
    where = " (~ is the home of the user Ray runs as there)" if job.run_dir.startswith("~") else ""
    print(f"  run directory, on the head node: {job.run_dir}{where}")
    print(f"  follow it:     streamrl logs {job.job_id} --address {address} --follow")
    print(f"  its status:    streamrl status {job.job_id} --address {address}")
    print(f"  Ray dashboard: {job.dashboard_link}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from rl import jobs

    address = _address(args)
    rows = jobs.list_jobs(address)
    if not rows:
        print(f"no jobs on the Ray cluster at {address}")
        return 0
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    for row in [dict(zip(cols, cols)), *rows]:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from rl import jobs

    print(json.dumps(jobs.status(args.job_id, _address(args)), indent=2))
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from rl import jobs

    text = jobs.logs(args.job_id, _address(args), follow=args.follow)
    if text:
        print(text, end="")
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from rl import jobs

    address = _address(args)
    jobs.stop(args.job_id, address)
    final = jobs.wait_for(args.job_id, address, {"STOPPED"}, timeout_s=args.timeout)
    print(f"job {args.job_id}: {final}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from rl.dashboard.command import dashboard

    return dashboard(args.run_dirs, args.host, args.port, args.export)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' where there is a default worth saying (not None, an empty list, or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An unknown command gets the closest one ("did you mean"), as an unknown recipe key does."""

    def error(self, message: str) -> None:  # type: ignore[override]
        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2))
            close = difflib.get_close_matches(bad.group(1), choices, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            message = f"unknown command '{bad.group(1)}'.{hint} Commands: {', '.join(choices)}"
        self.exit(2, f"{self.prog}: {message}\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamrl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    fmt = {"formatter_class": _HelpFormatter}
    p = _Parser(prog="streamrl", description="Asynchronous RL post-training for LLMs.", **fmt)
    p.add_argument("--version", action="version", version=f"streamrl {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipe_help = "recipe YAML file (recipes/*.yaml; every key is in rl/core/config.py)"
    overrides_help = "key=value overrides, e.g. trainer.world_size=2 algorithm.eta=0"

    run = sub.add_parser("run", help="run a recipe on this machine (or the Ray cluster in resources.ray_address)", **fmt)
    run.add_argument("recipe", help=recipe_help)
    run.add_argument("overrides", nargs="*", help=overrides_help)
    run.add_argument("--run-dir", default=None, help="a new run directory; one that holds a run is refused (streamrl "
                     "resume it) (default: logging.run_dir or runs/<time>-<name>)")
    run.add_argument("--dry-run", action="store_true", help="load the recipe, run the checks made before start-up "
                     "(plugins, trackers, model path, data), print what was checked and exit: 0 passed, 2 not")
    run.set_defaults(fn=_cmd_run)

    rs = sub.add_parser("resume", help="continue a killed run from its last checkpoint (needs "
                        "trainer.checkpoint_every) and its data store log", **fmt)
    rs.add_argument("run_dir", help="the run directory of the run to continue (holds config.yaml, checkpoints/)")
    rs.add_argument("overrides", nargs="*", help="key=value overrides on top of the run's saved recipe")
    rs.add_argument("--dry-run", action="store_true", help="run the checks and exit, as run --dry-run")
    rs.set_defaults(fn=_cmd_resume)

    cf = sub.add_parser("config", help="print the resolved recipe (schema defaults <- RECIPE <- overrides) and exit",
                        **fmt)
    cf.add_argument("recipe", nargs="?", default=None, help=recipe_help + "; omitted: the schema defaults")
    cf.add_argument("overrides", nargs="*", help=overrides_help)
    cf.set_defaults(fn=_cmd_config)

    mk = sub.add_parser("make-model", help="build (or find in the cache) the warm-started tiny model of a recipe and "
                        "print the model.path to pass", **fmt)
    mk.add_argument("recipe", nargs="?", default=None, help=recipe_help + "; omitted: the schema defaults")
    mk.add_argument("overrides", nargs="*", help=overrides_help + " (model.tiny.*, model.cache_dir)")
    mk.set_defaults(fn=_cmd_make_model)

    addr = {"default": os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
            "help": "the cluster's job server (dashboard) URL, http://HEAD:8265; HEAD:6379 (the GCS port) and "
                    "ray://HEAD:10001 are mapped to HEAD:8265 (env RAY_API_SERVER_ADDRESS sets the default)"}
    sb = sub.add_parser("submit", help="submit a recipe to a Ray cluster as a Ray job", **fmt)
    sb.add_argument("recipe", help=recipe_help)
    sb.add_argument("overrides", nargs="*", help=overrides_help)
    sb.add_argument("--address", **addr)
    sb.add_argument("--name", default=None, help="a name stored with the job (default: logging.name)")
    sb.set_defaults(fn=_cmd_submit)
    ls = sub.add_parser("list", help="list the jobs of a Ray cluster: id, status, name, start, run directory", **fmt)
    ls.add_argument("--address", **addr)
    ls.set_defaults(fn=_cmd_list)
    for verb, fn, text in (("status", _cmd_status, "a job's status and run directory"), ("logs", _cmd_logs, "a job's logs"),
                           ("stop", _cmd_stop, "stop a job")):
        sp = sub.add_parser(verb, help=text, **fmt)
        sp.add_argument("job_id", help="the job's id, as `streamrl submit` printed it (streamrl list shows them)")
        sp.add_argument("--address", **addr)
        if verb == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        if verb == "stop":
            sp.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for STOPPED")
        sp.set_defaults(fn=fn)

    dash = sub.add_parser("dashboard", help="serve the dashboard of run directories (finished or running; several: "
                                            "their curves overlaid), or --export it to one HTML file", **fmt)
    dash.add_argument("run_dirs", nargs="+", metavar="run_dir",
                      help="a run directory (holds metrics.jsonl, timeline.jsonl, status.json); several to compare")
    dash.add_argument("--export", metavar="FILE", default=None,
                      help="write one self-contained HTML file (opens with no server) instead of serving")
    dash.add_argument("--port", type=int, default=8266, help="port to listen on; 0 picks a free one")
    dash.add_argument("--host", default="127.0.0.1", help="interface to listen on; 0.0.0.0 for other machines")
    dash.set_defaults(fn=_cmd_dashboard)

    bench = sub.add_parser("bench", help="run a benchmark: prints a table and one JSON line (see rl/bench)", **fmt)
    bench.add_argument("name", nargs="?", default=None, help="benchmark name (--list shows them), e.g. datastore")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options (--help for them)")
    bench.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (`run R --dry-run a.b=1`): argparse leaves them over
        if getattr(args, "overrides", None) is None or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from rl.jobs import JobNotFoundError

    try:
        return args.fn(args)
    except RecipeError as exc:  # one line per problem (a PreflightError holds several)
        for line in str(exc).splitlines():
            print(f"streamrl: recipe error: {line}", file=sys.stderr)
        return 2
    except (ConnectionError, FileExistsError, FileNotFoundError, TimeoutError, JobNotFoundError, PermissionError) as exc:
        print(f"streamrl: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
