"""End to end: the same recipe run synchronously (eta = 0) and asynchronously (eta = --eta) in one process.

Figures for each: trained samples/s over the training loop, seconds per step, and time-to-reward: the
seconds from the first step until the mean reward over --window steps first reaches --target. The ratio
async/sync of each is the figure to compare.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from rl.bench import print_table, run_recipe, time_to_reward


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="recipes/cpu_default.yaml")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eta", type=int, default=2, help="the asynchronous run's staleness bound")
    p.add_argument("--target", type=float, default=0.45, help="reward level for time-to-reward")
    p.add_argument("--window", type=int, default=10, help="steps in the moving mean of reward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="recipe overrides applied to both runs")


def _one(recipe_path: str, eta: int, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    records, t_loop, _ = run_recipe(recipe_path, [*args.overrides, f"algorithm.eta={eta}",
                                                  f"trainer.total_steps={args.steps}", f"seed={args.seed}"], str(run_dir))
    loop_s = records[-1]["time"] - t_loop
    samples = sum(r["samples"] for r in records)
    k = max(1, len(records) // 10)
    ttr = time_to_reward([r["reward/mean"] for r in records], [r["time"] for r in records], t_loop, args.target,
                         args.window)
    return {"eta": eta, "steps": len(records), "loop_s": loop_s, "samples_per_s": samples / loop_s,
            "s_per_step": loop_s / len(records), "time_to_reward_s": ttr,
            "reward_first10": sum(r["reward/mean"] for r in records[:k]) / k,
            "reward_last10": sum(r["reward/mean"] for r in records[-k:]) / k,
            "staleness_mean": sum(r["staleness/mean"] for r in records) / len(records)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    out = Path(tempfile.mkdtemp(prefix="streamrl-bench-e2e-"))
    sync = _one(args.recipe, 0, args, out / "eta0")
    ray.shutdown()
    asyn = _one(args.recipe, args.eta, args, out / f"eta{args.eta}")
    ray.shutdown()
    rows = [{"run": f"eta={r['eta']}", "steps": r["steps"], "loop s": r["loop_s"], "samples/s": r["samples_per_s"],
             "s/step": r["s_per_step"], f"time to reward {args.target} (s)": r["time_to_reward_s"] or "not reached",
             "reward first 10%": r["reward_first10"], "reward last 10%": r["reward_last10"],
             "staleness": r["staleness_mean"]} for r in (sync, asyn)]
    print_table(rows, title=f"end to end: {args.recipe}, {args.steps} steps each")
    ttr = (sync["time_to_reward_s"] / asyn["time_to_reward_s"]
           if sync["time_to_reward_s"] and asyn["time_to_reward_s"] else None)
    return {"recipe": args.recipe, "sync": sync, "async": asyn, "target": args.target,
            "samples_per_s_ratio_async_over_sync": asyn["samples_per_s"] / sync["samples_per_s"],
            "time_to_reward_speedup_sync_over_async": ttr, "run_dirs": str(out)}
