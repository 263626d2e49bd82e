"""`streamrl bench NAME`: benchmarks that print a readable table and end with one line of JSON.

Each benchmark is a module `rl.bench.<name>` (dashes in NAME become underscores) with
`add_args(parser)` and `run(args) -> dict`. The dict is the figures, each with the baseline measured in the
same run beside it (ratios are what we compare: these machines are noisy). This package prints the table
and the final JSON line `{"bench": NAME, ...}` and writes the same JSON to `--out FILE` when given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import time
from pathlib import Path
from typing import Any, Sequence


def available() -> list[str]:
    import rl.bench as pkg

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def load(name: str):
    names = available()
    if name not in names:
        raise SystemExit(f"streamrl bench: unknown benchmark {name!r}; available: {', '.join(names) or 'none'}")
    return importlib.import_module(f"rl.bench.{name.replace('-', '_')}")


def print_table(rows: Sequence[dict[str, Any]], title: str = "") -> None:
    """A plain aligned table of dict rows (same keys), readable in any log."""
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for key in rows[0]:
        table.add_column(str(key), justify="right")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row.values()])
    Console(width=200).print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def run_recipe(recipe: str | None, overrides: list[str], run_dir: str) -> tuple[list[dict[str, Any]], float, float]:
    """A whole streamrl run of `recipe` + `overrides` in this process, quietly (no bar, no dashboard, no
    final export), in `run_dir`. Returns every step's record (read back from metrics.jsonl: the controller
    keeps only the last few in memory), when the training loop started (time.time()) and the seconds spent
    before it (Ray, store, engines, trainer)."""
    from rl.core.config import load_recipe
    from rl.controller import Controller
    from rl.metrics import read_metrics

    t0 = time.time()
    r = load_recipe(recipe, [*overrides, f"logging.run_dir={run_dir}", "logging.progress=false",
                             "logging.dashboard=false", "trainer.export_final=false"])
    ctl = Controller(r)
    ctl.build()
    try:
        t_loop = time.time()
        records = ctl.run()
    finally:
        ctl.shutdown()
    return read_metrics(Path(run_dir)) or records, t_loop, t_loop - t0


def time_to_reward(rewards: Sequence[float], ends: Sequence[float], start: float, target: float,
                   window: int) -> float | None:
    """Seconds from `start` until the moving mean of reward over `window` steps first reaches `target`
    (`ends[k]`: when step k ended); None if it never does."""
    for k in range(min(window, len(rewards)) - 1, len(rewards)):
        lo = max(0, k - window + 1)
        if sum(rewards[lo: k + 1]) / (k + 1 - lo) >= target:
            return ends[k] - start
    return None


def machine() -> dict[str, Any]:
    import os

    info: dict[str, Any] = {"host_cpus": os.cpu_count(), "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except Exception:
        pass
    return info


def main(name: str, argv: list[str]) -> int:
    mod = load(name)
    parser = argparse.ArgumentParser(prog=f"streamrl bench {name}", description=(mod.__doc__ or "").strip())
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    mod.add_args(parser)
    args = parser.parse_args(argv)
    figures = mod.run(args)
    result = {"bench": name, **figures, "machine": machine()}
    line = json.dumps(result, default=float)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0
