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

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datastore import log as dlog
from rl.staleness import newest_trainable
from trainer.checkpoint import CHECKPOINTS, latest_checkpoint

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
