from rl.staleness import StalenessBudget


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
