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


def test_an_actor_that_died_is_told_from_one_that_raised_a_death_it_saw(ray_session):
    """A real dead actor's error is a death; a live actor raising PeerDied (a storage unit it called died)
    arrives as Ray's RayTaskError, also a PeerDied, and is not. The restart after a fault keys on the type."""
    import os

    import ray

    from datastore.errors import StoreActorDied
    from rl.core.waits import PeerDied, died, wait
    from rl.recovery import restart_cause
    from trainer.group import TrainerRankDied

    @ray.remote(num_cpus=0)
    class Actor:
        def saw_a_death(self):
            raise StoreActorDied("data store storage unit 1 (of 2) died while we waited for a put")

        def exit(self):
            os._exit(1)

    a = Actor.remote()
    with pytest.raises(PeerDied) as raised:
        wait(a.saw_a_death.remote(), 30, "a call", "the actor")
    assert not died(raised.value)
    assert restart_cause(RuntimeError("rollout failed")) is None
    wrapped = RuntimeError("rollout failed while training step 3 waited")
    wrapped.__cause__ = raised.value
    assert restart_cause(wrapped) == "data store storage unit 1 (of 2) died while we waited for a put"
    with pytest.raises(PeerDied) as gone:
        wait(a.exit.remote(), 30, "a call", "the actor")
    assert died(gone.value) and restart_cause(gone.value) is None  # an actor of ours, not a trainer rank or store
    assert restart_cause(TrainerRankDied("trainer rank 0 died while we waited for training step 6: gone."))
