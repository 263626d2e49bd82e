"""What a resume keeps of a run directory, without Ray: the lost lineage, the records a rewind writes, and the
refusals of `streamrl run` into a run's directory and of `streamrl resume` without a checkpoint."""

import json

import pyarrow as pa
import pytest

from datastore import log as dlog
from rl import cli
from rl.core.config import load_recipe, to_yaml
from rl.controller import PARTITION
from rl.resume import TRAINED, Resume, lost_lineage, refuse_existing_run, require_checkpoint
from rl.core.staleness import StalenessBudget

N = 2  # group size


def write_log(log_dir, rows):
    """rows: (index, version, token_versions), as a storage unit logs finished samples."""
    w = dlog.RowLog(log_dir, 0, dlog.session_id())
    w.append(PARTITION, pa.table({"index": [r[0] for r in rows], "version": [r[1] for r in rows],
                                  "token_versions": pa.array([r[2] for r in rows], pa.list_(pa.int64()))}))
    w.close()


# group 0: versions 3 (trained at step 3); 1: 4, untrained; 2: one sample cut by the sync to version 5;
# 3: version 5; 4: one sample logged (the other was lost), version 6; 5: version 4, a sample with no tokens
ROWS = [(0, 3, [3]), (1, 3, [3, 3]), (2, 4, [4]), (3, 4, [4, 4]), (4, 4, [4, 4]), (5, 4, [4, 5]),
        (6, 5, [5]), (7, 5, [5]), (8, 6, [6, 6]), (10, 4, [4]), (11, 4, [])]


def test_lost_lineage_is_every_group_a_newer_version_touched(tmp_path):
    write_log(tmp_path, ROWS)
    assert lost_lineage(tmp_path, PARTITION, 4, N) == [4, 5, 6, 7, 8]  # version is a sample's oldest token's
    assert lost_lineage(tmp_path, PARTITION, 5, N) == [8]
    assert lost_lineage(tmp_path, PARTITION, 4, N, skip=[4, 5, 6, 7]) == [8]
    assert lost_lineage(tmp_path, PARTITION, 6, N) == []
    assert lost_lineage(tmp_path / "nothing", PARTITION, 0, N) == []


def resumable_run(tmp_path, trained):
    run_dir = tmp_path / "run"
    write_log(run_dir / "datastore", ROWS)
    (run_dir / TRAINED).write_text("".join(json.dumps(r) + "\n" for r in trained))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": r["step"]}) + "\n" for r in trained))
    dlog.ConsumptionLog(run_dir / "datastore").append(PARTITION, "trainer", "take", list(range(12)))
    return run_dir, lambda step: Resume(run_dir, PARTITION, step, N, batch_groups=1)


def trainer_consumed(run_dir):
    return sorted(dlog.read_consumed(run_dir / "datastore")[PARTITION]["trainer"])


def test_rewind_drops_the_lost_lineage_and_later_resumes_keep_it_dropped(tmp_path):
    steps = [{"step": 3, "trained": [0, 1], "dropped": []}, {"step": 4, "trained": [2, 3], "dropped": []},
             {"step": 5, "trained": [10, 11, 6, 7], "dropped": []}]
    run_dir, at = resumable_run(tmp_path, steps)
    at(4).rewind_records()  # crash after step 5, checkpoint 4
    recs = [json.loads(line) for line in (run_dir / TRAINED).read_text().splitlines()]
    assert recs == [steps[0], {"step": 4, "trained": [], "dropped": [], "lost_lineage": [4, 5, 6, 7, 8]}]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [3]
    assert trainer_consumed(run_dir) == [0, 1, 4, 5, 6, 7, 8]  # 2, 3, 10, 11: made by version 4, trained again

    # the resumed run (another lineage of versions 5, 6) trains 2, 3 at step 4 and crashes after checkpoint 6:
    # rows 4..8 stay dropped (versions 5 and 6 are now other weights than the ones that made them)
    with open(run_dir / TRAINED, "a") as f:
        f.write(json.dumps({"step": 4, "trained": [2, 3], "dropped": []}) + "\n")
    at(6).rewind_records()
    assert trainer_consumed(run_dir) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # a second crash before the next checkpoint: resuming at 4 again finds the same lost rows
    at(4).rewind_records()
    assert trainer_consumed(run_dir) == [0, 1, 4, 5, 6, 7, 8]


def test_run_into_a_run_directory_is_refused_before_anything_starts(tmp_path, capsys):
    refuse_existing_run(tmp_path / "new")  # absent or empty: fine
    refuse_existing_run(tmp_path)
    (tmp_path / "datastore").mkdir()
    with pytest.raises(FileExistsError, match=f"streamrl resume {tmp_path}"):
        refuse_existing_run(tmp_path)
    assert cli.main(["run", "recipes/cpu_default.yaml", "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} already holds a run (datastore)" in err and "fresh directory" in err
    assert not (tmp_path / "config.yaml").exists()  # nothing written


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(to_yaml(load_recipe(None, [])))
    with pytest.raises(FileNotFoundError, match="trainer.checkpoint_every=0, the default"):
        require_checkpoint(tmp_path, 0)
    assert cli.main(["resume", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"no complete checkpoint under {tmp_path / 'checkpoints'}" in err and "trainer.checkpoint_every" in err
    assert not (tmp_path / TRAINED).exists() and not (tmp_path / "datastore").exists()  # nothing started
    (tmp_path / "checkpoints" / "step_4").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="before its first checkpoint"):  # step_4 is incomplete
        require_checkpoint(tmp_path, 2)
    (tmp_path / "checkpoints" / "step_4" / ".metadata").touch()
    assert require_checkpoint(tmp_path, 2).name == "step_4"


def test_restored_budget_counts_each_group_still_to_train_once(tmp_path):
    """Steps 0..3 of B = 2 groups trained; then group 1 held whole, group 2 held without its sample 5,
    group 3 a lost lineage, group 4 lost in the crash, group 5 trained: the budget holds 4 * 2 trained plus
    one slot per group still to train (1, 2 and 4), once the requeued ones (2 and 4) are submitted."""
    from types import SimpleNamespace

    (tmp_path / TRAINED).write_text(json.dumps({"step": 3, "trained": [0, 1, 10, 11], "dropped": []}) + "\n"
                                    + json.dumps({"step": 4, "trained": [], "dropped": [], "lost_lineage": [6, 7]}) + "\n")
    budget = StalenessBudget(batch_groups=2, eta=1)
    feeder = SimpleNamespace(next_group=0, resume_at=lambda g: setattr(feeder, "next_group", g))
    requeue = Resume(tmp_path, PARTITION, 4, N, batch_groups=2).restore_rollout({"next_index": 12}, [2, 3, 4],
                                                                                 feeder, budget)
    assert requeue == [(2, [1]), (4, [0, 1])]  # sample numbers within the group
    assert feeder.next_group == 6
    for _ in requeue:  # as Stages.start submits them
        budget.on_submit()
    assert budget.submitted == 4 * 2 + 3
