"""One metrics stream, several sinks: the console (a progress bar and a line a step) and metrics.jsonl.

`phase(name)` times a stretch of the controller's loop and records it both as a metric
(`time/<name>_s`) and as a span on the activity timeline (`timeline.jsonl`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

CONSOLE_KEYS = [
    ("reward/mean", "reward", "{:.3f}"), ("response/len_mean", "len", "{:.1f}"),
    ("actor/kl_behaviour", "kl", "{:.4f}"), ("actor/entropy", "ent", "{:.3f}"),
    ("throughput/samples_per_s", "samples/s", "{:.1f}"), ("staleness/mean", "stale", "{:.2f}"),
    ("time/step_s", "step_s", "{:.2f}"),
]


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 jsonl: bool = True) -> None:
        self.run_dir = run_dir
        self.file = open(run_dir / "metrics.jsonl", "a") if jsonl else None
        self.timeline = open(run_dir / "timeline.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="RL steps", disable=not progress,
                        dynamic_ncols=True)
        self.pending: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, actor: str = "controller") -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            t1 = time.time()
            self.pending[f"time/{name}_s"] = self.pending.get(f"time/{name}_s", 0.0) + (t1 - t0)
            self.span(actor, name, t0, t1)

    def span(self, actor: str, kind: str, start: float, end: float) -> None:
        self.timeline.write(json.dumps({"actor": actor, "kind": kind, "start": start, "end": end}) + "\n")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step, "time": time.time(), **self.pending, **metrics}
        self.pending = {}
        if self.file:
            self.file.write(json.dumps(record, default=_jsonable) + "\n")
            self.file.flush()
        self.timeline.flush()
        parts = [f"step {step:>4}"]
        for key, label, fmt in CONSOLE_KEYS:
            if key in record and isinstance(record[key], (int, float)) and math.isfinite(record[key]):
                parts.append(f"{label} {fmt.format(record[key])}")
        self.bar.write("  ".join(parts))
        self.bar.set_postfix(reward=f"{record.get('reward/mean', float('nan')):.3f}")
        self.bar.update(1)
        return record

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        self.timeline.close()


def _jsonable(x: Any) -> Any:
    return float(x) if hasattr(x, "__float__") else str(x)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def learning_summary(records: list[dict[str, Any]], key: str = "reward/mean") -> dict[str, float]:
    """Mean of `key` over the first and the last 10% of steps (at least one step each), and the gain."""
    vals = [r[key] for r in records if key in r]
    if not vals:
        return {}
    k = max(1, len(vals) // 10)
    first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
    return {"steps": len(vals), "first10": first, "last10": last, "gain": last - first}
