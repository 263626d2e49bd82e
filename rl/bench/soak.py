"""Soak: a long run of a recipe, with the memory of every process and the run directory sampled as it goes.

`streamrl bench soak --minutes 30` starts `streamrl run RECIPE` (default: the CPU default recipe, with
enough steps to outlast the soak) as a child process, samples the resident memory (RSS) of the driver and
of every process it started (Ray's GCS and raylet, every actor, vLLM's engine processes) and the size of
the run directory every `--sample-s`, then stops the run with SIGTERM (the clean stop). Growth is the
slope of a least-squares line through the samples after the warm-up (`--warmup-min`), in MB per 10
minutes, beside the target of issue 19 (under 5 MB per 10 minutes for every process). Processes of one
kind (e.g. several `ray::StorageUnit`) are summed.

`--faults engine,rollout,storage,trainer` kills (SIGKILL) one process of each kind in turn every
`--fault-every-min` minutes after the warm-up (rl/bench/faults.py) and reports how long the run took to get
past the step it was at, the faults survived, and rows trained twice (must be 0). With trainer or storage
faults the run checkpoints every 50 steps (the restart goes on from the last checkpoint). Memory growth
with faults counts the replaced processes' start-up too.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rl.bench.faults import FaultSchedule, lineage_check, titles_below

TARGET_MB_PER_10MIN = 5.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="how long the run goes on")
    p.add_argument("--warmup-min", type=float, default=0.0,
                   help="minutes left out of the growth fit (default: a fifth of --minutes, at most 5)")
    p.add_argument("--sample-s", type=float, default=20.0, help="seconds between samples")
    p.add_argument("--recipe", default="recipes/cpu_default.yaml")
    p.add_argument("--faults", default="", help="comma-separated kinds to SIGKILL in turn (rl/bench/faults.py): "
                   "engine, rollout, storage, trainer, reward; empty: none")
    p.add_argument("--fault-every-min", type=float, default=3.0, help="minutes between faults (from the warm-up's end)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")


RAY_SCRIPTS = {"monitor.py": "monitor.py", "log_monitor.py": "log_monitor", "dashboard.py": "dashboard (Ray head)",
               "agent.py": "dashboard_agent", "main.py": "runtime_env_agent"}  # Ray's Python daemons, by script


def kind(cmdline: list[str], name: str) -> str:
    """A readable kind for a process of the run: Ray's actors by class, its daemons by program. Daemons are
    told by their program (the executable, or the script a Python runs), not by any word of the command
    line: an agent's arguments name the raylet's socket, and would count it as the raylet."""
    line = " ".join(cmdline)
    m = re.match(r"ray::(\w+)", line) or re.match(r"ray::(\w+)", name)
    if m:
        return f"ray::{m.group(1)}"
    programs = [os.path.basename(a) for a in cmdline[:3] if not a.startswith("-")]
    for daemon in ("gcs_server", "raylet"):
        if daemon in programs:
            return daemon
    script = next((p for p in programs if p.endswith(".py")), None)
    if script in RAY_SCRIPTS and "/ray/" in line:
        return RAY_SCRIPTS[script]
    if "multiprocessing.resource_tracker" in line:
        return "python (multiprocessing resource tracker)"
    m = re.search(r"VLLM::(\w+)", line) or re.search(r"VLLM::(\w+)", name)
    if m:
        return f"VLLM::{m.group(1)}"
    if "multiprocessing" in line:
        return "python (multiprocessing child)"
    return name or (cmdline[0] if cmdline else "?")


def sample_rss(root: int) -> dict[str, float]:
    """MB of RSS per kind of process: the driver `root` and everything below it."""
    import psutil

    out: dict[str, float] = {}
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            name = "driver (streamrl run)" if p.pid == root else kind(p.cmdline(), p.name())
            out[name] = out.get(name, 0.0) + p.memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def slope_per_10min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), in units per 10 minutes; 0 with fewer than 2 points."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else 600.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var


def step_rate(run_dir: Path) -> tuple[int, float]:
    """Steps the run logged in metrics.jsonl, and steps a second between its first and last record."""
    from rl.metrics import read_metrics

    times = [r["time"] for r in read_metrics(run_dir) if isinstance(r.get("time"), (int, float))]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return len(times), (len(times) - 1) / span if span > 0 else 0.0


def _title(p: Any) -> str:
    return " ".join(p.cmdline()) + " " + p.name()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from rl.bench import print_table

    warmup_s = 60.0 * (args.warmup_min or min(args.minutes / 5, 5.0))
    run_dir = Path(tempfile.mkdtemp(prefix="streamrl-soak-")) / "run"
    faults = FaultSchedule([k for k in args.faults.split(",") if k], 60 * args.fault_every_min, max(warmup_s, 60.0))
    restarts_run = {"trainer", "storage"} & set(faults.kinds)  # these restart from a checkpoint
    ckpt = ["trainer.checkpoint_every=50", "trainer.keep_checkpoints=2"] if restarts_run else []
    cmd = [sys.executable, "-m", "rl.cli", "run", args.recipe, "trainer.total_steps=100000000",
           f"logging.run_dir={run_dir}", "logging.progress=false", "logging.dashboard=false",
           "trainer.export_final=false", *ckpt, *args.overrides]
    log_path = run_dir.parent / "run.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        samples: list[tuple[float, dict[str, float], float]] = []
        try:
            while time.time() - t0 < 60 * args.minutes and proc.poll() is None:
                samples.append((time.time() - t0, sample_rss(proc.pid), dir_mb(run_dir)))
                print(f"[soak] {samples[-1][0]:6.0f} s: {sum(samples[-1][1].values()):8.0f} MB RSS in "
                      f"{len(samples[-1][1])} kinds, run dir {samples[-1][2]:.1f} MB", flush=True)
                t = time.time() - t0
                faults.check(t, run_dir)
                due = faults.due(t)
                if due is not None:
                    f = faults.inject(due, t, titles_below(proc.pid, _title), run_dir)
                    print(f"[soak] {t:6.0f} s: fault {due}: SIGKILL pid {f.pid} at step {f.step}", flush=True)
                time.sleep(args.sample_s)
            faults.check(time.time() - t0, run_dir)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    steps, steps_per_s = step_rate(run_dir)
    fit = [(t, rss, d) for t, rss, d in samples if t >= warmup_s]
    kinds = sorted({k for _, rss, _ in samples for k in rss})
    rows = []
    growth: dict[str, float] = {}
    for k in kinds:
        ts = [t for t, rss, _ in fit if k in rss]
        ys = [rss[k] for _, rss, _ in fit if k in rss]
        growth[k] = slope_per_10min(ts, ys)
        rows.append({"process": k, "RSS first MB": next((rss[k] for _, rss, _ in samples if k in rss), 0.0),
                     "RSS last MB": ys[-1] if ys else 0.0, "MB / 10 min": growth[k],
                     "target": f"< {TARGET_MB_PER_10MIN:g}", "ok": abs(growth[k]) < TARGET_MB_PER_10MIN})
    run_dir_growth = slope_per_10min([t for t, _, _ in fit], [d for _, _, d in fit])
    rows.append({"process": "run directory (disk)", "RSS first MB": samples[0][2] if samples else 0.0,
                 "RSS last MB": samples[-1][2] if samples else 0.0, "MB / 10 min": run_dir_growth, "target": "",
                 "ok": ""})
    print_table(rows, title=f"soak: {args.recipe} for {args.minutes:g} min ({steps} steps, {steps_per_s:.2f} a "
                            f"second), growth fitted after {warmup_s / 60:.1f} min, {len(fit)} of {len(samples)} "
                            "samples")
    out_faults: dict[str, Any] = {}
    if faults.done:
        from rl.recovery import read_restarts

        print_table(faults.rows(), title="faults (SIGKILL), and how long until the run recorded a step past the "
                                         "one it was at (a restart from a checkpoint runs the steps after it again)")
        lineage = lineage_check(run_dir)
        survived = sum(f.recovered_s is not None for f in faults.done if f.pid > 0)
        print(f"faults survived {survived} of {len(faults.done)}; rows trained twice {lineage['trained_twice']} "
              f"(must be 0); finished rows dropped as a lost lineage at a restart {lineage['lost_lineage_rows']}")
        out_faults = {"faults": faults.rows(), "faults_survived": survived, "restarts": len(read_restarts(run_dir)),
                      **lineage}
    return {"minutes": args.minutes, "steps": steps, "steps_per_s": steps_per_s, "warmup_s": warmup_s,
            "samples": len(samples), **out_faults,
            "rc": proc.returncode, "growth_mb_per_10min": growth, "run_dir_mb_per_10min": run_dir_growth,
            "target_mb_per_10min": TARGET_MB_PER_10MIN,
            "over_target": sorted(k for k, g in growth.items() if abs(g) >= TARGET_MB_PER_10MIN),
            "run_dir": str(run_dir), "log": str(log_path)}
