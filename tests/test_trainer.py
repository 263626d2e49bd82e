"""The FSDP2 trainer on real Ray actors, gloo and files: micro-batching and rank count leave the update
unchanged, resume from a distributed checkpoint is bit-exact (and reshards), a dead rank is named, and the
HF export loads in transformers."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import ray

from datastore.client import DataStore
from rl.core.config import load_recipe
from rl.core.waits import PeerDied
from trainer.group import TrainerGroup
from trainer.worker import TRAIN_FIELDS

GROUPS, GROUP_SIZE = 4, 4


def recipe(model: str, world_size: int, *extra: str):
    return load_recipe(None, [
        f"model.path={model}", f"trainer.world_size={world_size}", f"trainer.batch_groups={GROUPS}",
        f"rollout.group_size={GROUP_SIZE}", "resources.wait_timeout_s=60", "algorithm.eta=0", *extra])


def put_step(store: DataStore, step: int) -> None:
    """The batch of `step`, the same in every run: even groups have long answers, odd groups short ones (so
    with two ranks, rank 0 needs more micro-batches than rank 1 under a token budget)."""
    idx, cols = [], {k: [] for k in TRAIN_FIELDS}
    for g in range(step * GROUPS, (step + 1) * GROUPS):
        rng = random.Random(g)
        for j in range(GROUP_SIZE):
            n = rng.randint(10, 16) if g % 2 == 0 else rng.randint(1, 3)
            response = [rng.randint(3, 60) for _ in range(n)]
            idx.append(g * GROUP_SIZE + j)
            cols["prompt_ids"].append([1] + [rng.randint(3, 60) for _ in range(rng.randint(3, 6))])
            cols["response_ids"].append(response)
            cols["logprobs"].append([rng.uniform(-6.0, -3.0) for _ in response])
            cols["loss_mask"].append([1] * n)
            cols["reward"].append(float(rng.random() < 0.5))
            cols["version"].append(step)
            cols["group"].append(g)
    store.put("train", idx, cols)


class Run:
    """A trainer group with its own data store, fed the deterministic batches above; like the controller, it
    starts an asynchronous checkpoint after every `trainer.checkpoint_every` steps."""

    def __init__(self, rec, model: str, run_dir=None, device: str = "cpu") -> None:
        self.every = rec.trainer.checkpoint_every if run_dir else 0
        self.store = DataStore.create(1, tag_fields=["version"], declared_fields=TRAIN_FIELDS)
        self.group = TrainerGroup(rec, model, self.store, "train", device, run_dir=run_dir)
        self.group.setup()

    def train(self, steps) -> list[dict]:
        out = []
        for step in steps:
            put_step(self.store, step)
            out.append(asyncio.run(self.group.train_step(step)).metrics)
            if self.every and (step + 1) % self.every == 0:
                asyncio.run(self.group.start_checkpoint())  # written in the background while training goes on
        return out

    def close(self) -> None:
        self.group.shutdown()
        self.store.shutdown()


def relative_difference(a: dict, b: dict, start: dict) -> float:
    """|a - b| relative to how far a moved from `start` (robust to Adam's sign-like steps on ~0 gradients)."""
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum((a[k] - start[k]) ** 2)) for k in a)
    return (num / den) ** 0.5


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", [[], ["algorithm.loss_agg=seq-mean-token-sum-norm", "algorithm.behaviour_cap_mode=mask"]],
                         ids=["token-mean", "token-sum-norm"])
def test_token_budget_micro_batches_and_two_ranks_match_one_big_batch(ray_session, tiny_model, loss):
    one = Run(recipe(tiny_model, 1, *loss), tiny_model)
    try:
        start = one.group.full_params()
        m1 = one.train(range(2))
        p1 = one.group.full_params()
    finally:
        one.close()
    two = Run(recipe(tiny_model, 2, "trainer.micro_batch_tokens=48", "trainer.micro_batch_size=4", *loss), tiny_model)
    try:
        m2 = two.train(range(2))
        p2 = two.group.full_params()
    finally:
        two.close()
    assert m1[0]["trainer/micro_batches"] == 1
    assert m2[0]["trainer/micro_batches"] >= 3  # rank 1 (short answers) ran empty micro-batches to keep pace
    assert m2[0]["trainer/pad_fraction"] < m1[0]["trainer/pad_fraction"]  # binning by length pads less
    for a, b in zip(m1, m2):
        assert a["actor/loss"] == pytest.approx(b["actor/loss"], rel=1e-4, abs=1e-6)
        assert a["actor/grad_norm"] == pytest.approx(b["actor/grad_norm"], rel=1e-4)
        assert a["samples"] == b["samples"] == GROUPS * GROUP_SIZE
    assert relative_difference(p1, p2, start) < 1e-3


ALGO = ["algorithm.advantage=gae", "algorithm.kl_reference=initial", "algorithm.kl_reward_coef=0.01",
        "algorithm.kl_coef=0.01", "algorithm.entropy_coef=0.001", "trainer.mini_batches=2",
        "trainer.micro_batch_tokens=64", "trainer.lr_schedule=cosine", "trainer.warmup_steps=1",
        "trainer.total_steps=4", "trainer.checkpoint_every=2"]


def test_resume_is_bit_exact_and_reshards(ray_session, tiny_model, tmp_path):
    a = Run(recipe(tiny_model, 2, *ALGO), tiny_model, run_dir=tmp_path / "a")
    try:
        a.train(range(2))  # step_2 starts writing in the background while steps 2, 3 train
        at_2 = a.group.full_params()
        ma = a.train(range(2, 4))
        final = a.group.full_params()
        a.group.wait_checkpoint()
    finally:
        a.close()
    ckpt = TrainerGroup.latest_checkpoint(tmp_path / "a")
    assert ckpt is not None and ckpt.name == "step_4"
    step_2 = tmp_path / "a" / "checkpoints" / "step_2"
    assert ma[1]["critic/value_loss"] == ma[1]["critic/value_loss"] and "actor/kl_reward" in ma[1]

    b = Run(recipe(tiny_model, 2, *ALGO), tiny_model, run_dir=tmp_path / "b")
    try:
        assert b.group.load_checkpoint(step_2) == 2
        assert identical(b.group.full_params(), at_2)
        mb = b.train(range(2, 4))
        assert identical(b.group.full_params(), final)  # model, AdamW, scheduler, critic: all restored exactly
        assert [m["actor/loss"] for m in mb] == [m["actor/loss"] for m in ma]
        assert mb[0]["actor/lr"] == ma[0]["actor/lr"]

        c = Run(recipe(tiny_model, 1, *ALGO), tiny_model, run_dir=tmp_path / "c")
        try:
            assert c.group.load_checkpoint(step_2) == 2  # saved by 2 ranks, loaded by 1
            assert identical(c.group.full_params(), at_2)
            c.train(range(2, 4))
            one_rank = c.group.full_params()
            assert relative_difference(final, one_rank, at_2) < 1e-2
            saved = c.group.save_checkpoint()
            assert saved.name == "step_4"
        finally:
            c.close()
        assert b.group.load_checkpoint(saved) == 4  # saved by 1 rank, loaded by 2
        assert identical(b.group.full_params(), one_rank)
    finally:
        b.close()


def test_dead_rank_is_named_and_a_new_group_resumes(ray_session, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    run = Run(recipe(tiny_model, 2, "trainer.checkpoint_every=1"), tiny_model, run_dir=tmp_path)
    try:
        run.train([0])
        after_0 = run.group.full_params()
        run.group.wait_checkpoint()

        async def step_with_a_death():
            task = asyncio.ensure_future(run.group.train_step(1))  # no data for step 1: the ranks wait
            await asyncio.sleep(2.0)
            ray.kill(run.group.ranks[1])
            return await task

        with pytest.raises(PeerDied) as err:
            asyncio.run(step_with_a_death())
    finally:
        run.close()
    msg = str(err.value)
    assert "trainer rank 1 died" in msg and "training step 1" in msg and "step_1" in msg, msg

    again = Run(recipe(tiny_model, 2, "trainer.checkpoint_every=1"), tiny_model, run_dir=tmp_path)
    try:
        assert again.group.resume_latest() == 1
        assert identical(again.group.full_params(), after_0)
        ids = [1, 20, 14, 22, 16, 30, 2]
        trainer_lp = again.group.sequence_logprobs(ids)
        out = again.group.export_hf(tmp_path / "hf")
    finally:
        again.close()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("1+2=")["input_ids"][0] == 1
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert np.allclose(lp.numpy(), trainer_lp[1:], atol=1e-5)
