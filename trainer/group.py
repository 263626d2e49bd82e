"""TrainerGroup: the controller's one handle on all trainer ranks (a thin typed facade over Ray).

Methods that fan a call out to every rank wait for all of them with the run's timeout, so a rank that
dies or hangs is reported by rank number instead of stalling the run.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from datastore.client import DataStore
from rl.config import Recipe
from rl.transport import WeightHandle
from rl.waits import await_, wait
from trainer.worker import TrainerActor


class TrainerGroup:
    def __init__(self, recipe: Recipe, model_path: str, store: DataStore, partition: str, device: str) -> None:
        self.recipe, self.timeout = recipe, recipe.resources.wait_timeout_s
        n = recipe.trainer.world_size
        bundle = {"CPU": 1, **({"GPU": 1} if device == "cuda" else {})}
        self.pg = placement_group([bundle] * n, strategy="PACK")
        wait(self.pg.ready(), self.timeout, f"a placement group of {n} x {bundle} for the trainer", "the Ray cluster",
             hint="the cluster may not have these resources free")
        self.ranks = [
            TrainerActor.options(
                num_gpus=1 if device == "cuda" else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, recipe, model_path, store, partition, device)
            for r in range(n)
        ]

    def _all(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        return wait(refs, self.timeout, what, f"trainer ranks 0..{len(self.ranks) - 1}")

    def setup(self) -> list[dict[str, Any]]:
        addr, port = wait(self.ranks[0].address.remote(), self.timeout, "its address", "trainer rank 0")
        return self._all([r.setup.remote(addr, port) for r in self.ranks], "process-group setup and model load")

    async def train_step(self, step: int) -> dict[str, float]:
        refs = [r.train_step.remote(step) for r in self.ranks]
        out = await await_(refs, self.timeout * 2, f"training step {step}", f"trainer ranks 0..{len(self.ranks) - 1}")
        return out[0]

    async def send_weights(self) -> WeightHandle:
        refs = [r.send_weights.remote() for r in self.ranks]
        out = await await_(refs, self.timeout, "gathered weights", f"trainer ranks 0..{len(self.ranks) - 1}")
        return out[0]

    async def release_weights(self, handle: WeightHandle) -> None:
        await await_(self.ranks[0].release_weights.remote(handle), self.timeout, "weight release", "trainer rank 0")

    def sequence_logprobs(self, token_ids: list[int]) -> list[float | None]:
        return self._all([r.sequence_logprobs.remote(token_ids) for r in self.ranks], "sequence logprobs")[0]

    def shutdown(self) -> None:
        try:
            wait([r.shutdown.remote() for r in self.ranks], 30, "shutdown", "trainer ranks")
        except Exception:
            pass
        for r in self.ranks:
            ray.kill(r)
        ray.util.remove_placement_group(self.pg)
