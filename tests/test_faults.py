"""The soak's fault schedule (rl/bench/faults.py): which fault is due when, that it kills the process it names,
and how recovery and the final lineage are read from a run directory."""

import json
import subprocess

import pytest

from rl.bench.faults import FaultSchedule, last_step, lineage_check


def test_faults_come_in_turn_on_schedule():
    s = FaultSchedule(["engine", "trainer"], every_s=60, start_s=120)
    assert s.due(119) is None and s.due(120) == "engine"
    s.done.append(object())  # one injected
    assert s.due(179) is None and s.due(180) == "trainer"
    with pytest.raises(ValueError, match="unknown fault kinds \\['gpu'\\]; valid: engine, rollout"):
        FaultSchedule(["gpu"], 60, 0)


def test_a_fault_kills_the_process_it_names_and_recovery_is_read_from_the_metrics(tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
        s = FaultSchedule(["storage"], every_s=60, start_s=0)
        f = s.inject("storage", 10.0, [(bystander.pid, "ray::RolloutWorker"), (victim.pid, "ray::StorageUnit")], tmp_path)
        assert victim.wait(10) == -9 and bystander.poll() is None
        assert (f.pid, f.step) == (victim.pid, 4)
        s.check(20.0, tmp_path)
        assert f.recovered_s is None  # no step past 4 yet
        with open(tmp_path / "metrics.jsonl", "a") as out:
            out.write(json.dumps({"step": 5}) + "\n")
        s.check(31.5, tmp_path)
        assert f.recovered_s == 21.5 and last_step(tmp_path) == 5
    finally:
        bystander.kill()
        victim.kill()


def test_the_lineage_check_counts_rows_trained_twice_and_lost_lineage(tmp_path):
    recs = [{"step": 0, "trained": [0, 1, 2], "dropped": []}, {"step": 1, "trained": [3, 2], "dropped": [9]},
            {"step": 1, "trained": [], "dropped": [], "lost_lineage": [7, 8]}]
    (tmp_path / "trained.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert lineage_check(tmp_path) == {"trained_rows": 5, "trained_twice": 1, "lost_lineage_rows": 2}
