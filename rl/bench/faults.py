"""Faults on a schedule for `streamrl bench soak --faults`: SIGKILL one real process of a running run, then
measure how long the run took to get past the step it was at.

Kinds, each a process of the run found by its title: engine (a vLLM EngineCore), rollout (a rollout worker's
actor), storage (a storage unit), trainer (a trainer rank), reward (a reward worker; none with reward.inline).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

TITLES = {"engine": "VLLM::EngineCore", "rollout": "ray::RolloutWorker", "storage": "ray::StorageUnit",
          "trainer": "ray::TrainerWorker", "reward": "ray::RewardWorker"}


def last_step(run_dir: Path) -> int:
    """The highest step in metrics.jsonl (-1 if none); a restart rewinds the file, so this can go down."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return -1
    steps = [-1]
    for line in f.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return max(steps)


@dataclass
class Fault:
    kind: str
    at_s: float  # seconds into the soak
    pid: int = -1
    step: int = -1  # the run's last step when it was killed
    recovered_s: Optional[float] = None  # until a step past `step` was recorded


@dataclass
class FaultSchedule:
    """Kills one process of each kind in `kinds` in turn, every `every_s` seconds from `start_s` on."""

    kinds: list[str]
    every_s: float
    start_s: float
    done: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in TITLES]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; valid: {', '.join(TITLES)}")

    def due(self, t: float) -> Optional[str]:
        n = len(self.done)
        if not self.kinds or t < self.start_s + n * self.every_s:
            return None
        return self.kinds[n % len(self.kinds)]

    def inject(self, kind: str, t: float, procs: list[tuple[int, str]], run_dir: Path) -> Fault:
        """SIGKILL the first process whose title names `kind` (`procs`: (pid, title) of the run's processes)."""
        fault = Fault(kind, t, step=last_step(run_dir))
        for pid, title in procs:
            if TITLES[kind] in title:
                try:
                    os.kill(pid, signal.SIGKILL)
                    fault.pid = pid
                except ProcessLookupError:
                    continue
                break
        self.done.append(fault)
        return fault

    def check(self, t: float, run_dir: Path) -> None:
        """Note the recovery time of each fault once the run records a step past the one it was killed at."""
        step = last_step(run_dir)
        for f in self.done:
            if f.recovered_s is None and f.pid > 0 and step > f.step:
                f.recovered_s = t - f.at_s

    def rows(self) -> list[dict[str, Any]]:
        return [{"fault": f.kind, "at s": f.at_s, "pid": f.pid, "at step": f.step,
                 "recovered in s": f.recovered_s if f.recovered_s is not None else "not yet"} for f in self.done]


def lineage_check(run_dir: Path) -> dict[str, int]:
    """What the final lineage trained: rows trained twice (must be 0), and finished rows dropped as a lost
    lineage at a restart (made by weights the restart threw away; new groups replaced them)."""
    rows: list[int] = []
    lost = 0
    f = Path(run_dir) / "trained.jsonl"
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        rows += rec.get("trained", [])
        lost += len(rec.get("lost_lineage", []))
    return {"trained_rows": len(rows), "trained_twice": len(rows) - len(set(rows)), "lost_lineage_rows": lost}


def titles_below(root: int, title_of: Callable[[Any], str]) -> list[tuple[int, str]]:
    """(pid, title) of every process below `root`."""
    import psutil

    out = []
    try:
        for p in psutil.Process(root).children(recursive=True):
            try:
                out.append((p.pid, title_of(p)))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    except psutil.NoSuchProcess:
        pass
    return out
