from rl.core.staleness import StalenessBudget, last_trainable_step, newest_trainable, oldest_trainable, trainable


def test_sync_eta0_allows_one_batch_per_version():
    b = StalenessBudget(batch_groups=4, eta=0)
    assert b.capacity(0) == 4
    b.on_submit(4)
    assert b.capacity(0) == 0
    b.on_finish(4)
    assert b.capacity(0) == 0  # finished but not trained: still no room until version 1
    assert b.capacity(1) == 4


def test_eta_lets_rollout_run_ahead_by_eta_batches():
    b = StalenessBudget(batch_groups=4, eta=2)
    assert b.capacity(0) == 12
    b.on_submit(12)
    assert b.capacity(0) == 0 and b.capacity(1) == 4


def test_dropped_groups_give_their_slots_back():
    b = StalenessBudget(batch_groups=4, eta=1)
    b.on_submit(8)
    b.on_finish(8)
    assert b.capacity(1) == 4
    b.on_drop(2)
    assert b.capacity(1) == 6 and b.dropped == 2


def test_max_running_caps_concurrency():
    b = StalenessBudget(batch_groups=4, eta=3, max_running=5)
    b.on_submit(5)
    assert b.capacity(0) == 0
    b.on_finish(3)
    assert b.capacity(0) == 3


def test_rule_bounds_every_group_start_version():
    """Simulate: group g may start at version v only if g < (v + eta + 1) * B."""
    B, eta = 3, 1
    b = StalenessBudget(B, eta)
    for v in range(5):
        cap = b.capacity(v)
        for _ in range(cap):
            g = b.submitted
            assert g < (v + eta + 1) * B
            b.on_submit()
            b.on_finish()


def test_rule_bounds_a_sample_from_both_sides():
    eta = 2
    assert oldest_trainable(5, eta) == 3 and newest_trainable(5) == 5
    assert [v for v in range(-1, 9) if trainable(v, 5, eta)] == [3, 4, 5]  # 6..8: made by a lost lineage
    assert [v for v in range(3) if trainable(v, 0, 0)] == [0]  # eta = 0: on-policy only


def test_admission_and_consumption_use_the_same_bound():
    """The last step admission plans for is the last step consumption accepts, for every version."""
    for eta in range(4):
        for v in range(6):
            steps = [s for s in range(20) if trainable(v, s, eta)]
            assert steps == list(range(v, last_trainable_step(v, eta) + 1))
            assert all(oldest_trainable(s, eta) <= v for s in steps)
