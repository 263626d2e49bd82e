"""rl.core.waits on a real local Ray: a placement group that cannot be placed times out with the cluster's
free resources in the message, and is removed rather than left pending."""

import pytest

from rl.core.waits import WaitTimeout, reserve


def test_reserve_that_cannot_fit_names_what_is_free_and_gives_the_group_back(ray_session):
    import ray

    with pytest.raises(WaitTimeout) as err:
        reserve([{"CPU": 1000}], 2.0, "a test that asks too much")
    msg = str(err.value)
    assert "a placement group of 1 x {'CPU': 1000} for a test that asks too much" in msg
    assert "The cluster has free {" in msg and "'CPU'" in msg and "memory" not in msg
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] == "PENDING"]  # removed
    pg = reserve([{"CPU": 1}], 30.0, "a group that fits")
    ray.util.remove_placement_group(pg)
