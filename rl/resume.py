"""What a run directory holds, and what a resume may keep of it.

- `streamrl run` never writes into a directory that holds a run: its store log would be replayed into the
  new run, whose step 0 would then train the old run's samples.
- `streamrl resume` needs a checkpoint: without one the old samples belong to weights that are gone, and
  starting at step 0 on them would train a new policy on another policy's lineage.
- Resuming at step S (the checkpoint's version), the samples in the store's log that any policy version
  above S helped make are a lineage lost with the crash: the resumed run's versions S+1, ... are other
  weights. Their whole groups are dropped (recorded in trained.jsonl as `lost_lineage`, so later resumes
  keep them dropped); the feeder starts new groups in their place. Samples of versions <= S that were
  finished and not yet trained are kept and trained.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datastore import log as dlog
from rl.core.staleness import newest_trainable
from rl.metrics import read_metrics
from trainer.checkpoint import CHECKPOINTS, latest_checkpoint

log = logging.getLogger(__name__)

TRAINED = "trained.jsonl"  # per step: the rows it trained on and dropped as too stale (a resume: as a lost lineage)
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "trained.jsonl", "datastore", CHECKPOINTS)


def refuse_existing_run(run_dir: Path) -> None:
    """FileExistsError if `run_dir` already holds (part of) a run."""
    found = [name for name in RUN_MARKERS if (Path(run_dir) / name).exists()]
    if found:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(found)}); a new run there would replay its data store "
            f"log and train its samples. To continue that run: streamrl resume {run_dir}. To start a new run: "
            f"give it a fresh directory (--run-dir NEW_DIR or logging.run_dir=NEW_DIR; with neither, "
            f"runs/<date>-<time>-<name> is used)")


def require_checkpoint(run_dir: Path, checkpoint_every: int) -> Path:
    """The newest complete checkpoint of `run_dir`; FileNotFoundError (no restart from step 0) if none."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return ckpt
    why = ("this run never checkpoints (trainer.checkpoint_every=0, the default)" if not checkpoint_every else
           f"this run stopped before its first checkpoint (trainer.checkpoint_every={checkpoint_every})")
    raise FileNotFoundError(
        f"cannot resume {run_dir}: no complete checkpoint under {Path(run_dir) / CHECKPOINTS}; {why}. A run can "
        f"be resumed only from a checkpoint, so set trainer.checkpoint_every=N (steps) to make runs resumable. "
        f"Nothing was started; run the recipe again in a fresh directory (streamrl run RECIPE --run-dir NEW_DIR)")


def consumed_rows(record: dict[str, Any]) -> list[int]:
    """The rows a trained.jsonl record took from the trainer: trained, dropped as too stale, or dropped as a
    lost lineage by a resume."""
    return record["trained"] + record["dropped"] + record.get("lost_lineage", [])


def lost_lineage(log_dir: Path, partition: str, step: int, group_size: int, skip: Iterable[int] = ()) -> list[int]:
    """Logged rows of `partition` that a run resumed at `step` must not train: every row (outside `skip`)
    of a group in which some sample has a token made by a policy version newer than `step`. A sample's
    `version` is its oldest token's; a sample cut by a weight update goes on with newer ones."""
    skip = set(skip)
    groups: dict[int, list[int]] = {}
    lost: set[int] = set()
    for path in dlog.segments(log_dir, partition):
        for batch in dlog.read_batches(path):
            idx = batch.column("index").to_numpy(zero_copy_only=False)
            newest = newest_token_version(batch)
            for i, v in zip(idx.tolist(), newest.tolist()):
                if i in skip:
                    continue
                groups.setdefault(i // group_size, []).append(i)
                if v > newest_trainable(step):
                    lost.add(i // group_size)
    return sorted(i for g in lost for i in set(groups[g]))


def newest_token_version(batch: pa.RecordBatch) -> np.ndarray:
    """Per row: the newest policy version that made any of its tokens (`version` when it has none)."""
    newest = batch.column("version").to_numpy(zero_copy_only=False).astype(np.int64)
    if "token_versions" not in batch.schema.names:
        return newest
    tv = batch.column("token_versions")
    flat = pc.list_flatten(tv)
    if len(flat):
        per_row = pa.table({"row": pc.list_parent_indices(tv), "v": flat}).group_by("row").aggregate([("v", "max")])
        rows = per_row.column("row").to_numpy()
        newest[rows] = np.maximum(newest[rows], per_row.column("v_max").to_numpy())
    return newest


class Resume:
    """A resume of the run in `run_dir` at `step` (its checkpoint's version). `rewind_records` sets the run's
    records back to the checkpoint before the store opens; `restore_rollout` tells the rollout side where
    to go on, through the feeder's and the budget's public methods, once the store has replayed its log."""

    def __init__(self, run_dir: Path, partition: str, step: int, group_size: int, batch_groups: int) -> None:
        self.run_dir, self.partition, self.step = Path(run_dir), partition, step
        self.group_size, self.batch_groups = group_size, batch_groups

    def rewind_records(self) -> None:
        """Forget what steps >= step did (their training was lost with the process), so they run again
        once: metrics and trained-row records are cut there, and the trainer's consumption in the store's
        log is set back to the rows those earlier steps trained on or dropped, plus the groups that versions
        after `step` helped make (a lost lineage), recorded at `step`."""
        step, run_dir = self.step, self.run_dir
        kept = [rec for rec in read_jsonl(run_dir / TRAINED) if rec["step"] < step]
        done = {i for rec in kept for i in consumed_rows(rec)}
        log_dir = run_dir / "datastore"
        lost = lost_lineage(log_dir, self.partition, step, self.group_size, done) if log_dir.exists() else []
        if lost:
            kept.append({"step": step, "trained": [], "dropped": [], "lost_lineage": lost})
            log.info("resume at step %d: dropped %d logged samples that versions after %d helped make (a lineage "
                     "lost with the crash); new groups take their place", step, len(lost), step)
        write_jsonl(run_dir / TRAINED, kept)
        write_jsonl(run_dir / "metrics.jsonl", [m for m in read_metrics(run_dir) if m["step"] < step])
        if log_dir.exists():
            consumed = dlog.read_consumed(str(log_dir))
            part = consumed.setdefault(self.partition, {})
            part["trainer"] = done | set(lost)
            dlog.rewrite_consumed(str(log_dir), {p: {c: sorted(v) for c, v in cs.items()} for p, cs in consumed.items()})

    def restore_rollout(self, recovered: dict[str, Any], held: Iterable[int], feeder: Any,
                        budget: Any) -> list[tuple[int, list[int]]]:
        """The feeder continues after the last group in the log (group g uses prompt row g), and the budget
        counts what is already there (groups of a lost lineage are not: new groups take their slots).
        `recovered`: the store's replay summary of the partition; `held`: the rows it holds for the trainer.
        Returns the groups that lost samples in the crash, with just those samples, to submit first."""
        n = self.group_size
        next_group = -(-recovered.get("next_index", 0) // n)
        trained = {i for r in read_jsonl(self.run_dir / TRAINED) for i in consumed_rows(r)}
        groups: dict[int, list[int]] = {}
        for i in held:
            groups.setdefault(i // n, []).append(i)
        # missing samples by their number j in the group (GroupRequest.samples), not by row index g * n + j
        partial = {g: sorted(set(range(n)) - {i % n for i in rows}) for g, rows in groups.items() if len(rows) < n}
        lost = [g for g in range(next_group) if g not in groups and not any(g * n + j in trained for j in range(n))]
        feeder.resume_at(next_group)
        # whole groups held; the requeued ones are counted as Stages.start submits them
        budget.restore(self.step * self.batch_groups + len(groups) - len(partial))
        log.info("resume: %d groups held, %d partial and %d lost groups to complete, next group %d",
                 len(groups), len(partial), len(lost), next_group)
        return [(g, missing) for g, missing in partial.items()] + [(g, list(range(n))) for g in lost]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a line cut by a crash is skipped); [] if there is none."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace `path` with `records`, atomically (a crash leaves the old file or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
