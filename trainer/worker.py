"""TrainerWorker: one Ray actor per rank of a torch.distributed group, training the policy with FSDP2.

A step: rank 0 claims the next batch of whole groups from the data store (metadata only) and broadcasts
the claim; every rank fetches its own groups' payload straight from the storage units, recomputes
logprobs, forms advantages and the loss (both looked up by name in `rl.algorithms`), and steps AdamW.
Then the full weights are gathered from the shards and sent to the rollout engines through the weight
channel.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import time
from typing import Any

import pyarrow as pa
import ray
import torch
import torch.distributed as dist

from datastore.client import DataStore
from datastore.controller import Take
from rl import algorithms
from rl.config import Recipe
from rl.transport import WeightHandle, make_sender

log = logging.getLogger(__name__)

TRAIN_FIELDS = ["prompt_ids", "response_ids", "logprobs", "reward", "version", "group"]
CONSUMER = "trainer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class TrainerWorker:
    def __init__(self, rank: int, recipe: Recipe, model_path: str, store: DataStore, partition: str,
                 device: str = "cpu") -> None:
        self.rank, self.recipe, self.model_path, self.store, self.partition = rank, recipe, model_path, store, partition
        self.world_size = recipe.trainer.world_size
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.version = 0
        self.model: Any = None
        self.sender = None
        torch.set_num_threads(recipe.trainer.threads_per_rank)

    # ------------------------------------------------------------------ setup
    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group, load the model, shard it with FSDP2, build the optimizer."""
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        timeout = datetime.timedelta(seconds=self.recipe.resources.wait_timeout_s)
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size, timeout=timeout)
        torch.manual_seed(self.recipe.seed)
        dtype = getattr(torch, self.recipe.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device)
        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        self.model = model
        t = self.recipe.trainer
        self.optim = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.loss_fn = algorithms.POLICY_LOSSES[self.recipe.algorithm.policy_loss]
        self.adv_fn = algorithms.ADVANTAGES[self.recipe.algorithm.advantage]
        a = self.recipe.algorithm
        self.loss_cfg = algorithms.LossConfig(a.clip_low, a.clip_high, a.behaviour_weight_cap, a.loss_agg,
                                              a.kl_coef, a.kl_estimator)
        if self.rank == 0:
            self.sender = make_sender("shm", tag=f"{os.getpid()}")
        n_params = sum(p.numel() for p in model.parameters())
        return {"rank": self.rank, "params": n_params, "setup_seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ step
    def _claim(self, step: int) -> tuple[Take, int]:
        """Rank 0 drops groups past the staleness bound, then claims B whole groups of version >=
        step - eta from the store; every rank learns the claim. Returns it and the groups dropped."""
        n = self.recipe.rollout.group_size
        box: list[Any] = [None]
        if self.rank == 0:
            floor = step - self.recipe.algorithm.eta
            dropped = self.store.discard(CONSUMER, self.partition, {"version": ("<", floor)}, group_size=n)
            take = self.store.take(CONSUMER, self.partition, TRAIN_FIELDS, self.recipe.trainer.batch_groups * n,
                                   group_size=n, where={"version": (">=", floor)},
                                   timeout=self.recipe.resources.wait_timeout_s)
            box[0] = (take, len(dropped) // n) if take is not None else RuntimeError(
                f"Timed out after {self.recipe.resources.wait_timeout_s:.0f} s waiting for "
                f"{self.recipe.trainer.batch_groups} complete groups (fields {TRAIN_FIELDS}, version >= {floor}) "
                f"from the data store for step {step}: are the rollout and reward workers alive? see their logs")
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def _my_share(self, take: Take) -> Take:
        """Whole groups for this rank: groups are dealt round-robin so every rank gets as many."""
        n = self.recipe.rollout.group_size
        groups = sorted({i // n for i in take.indexes})
        mine = set(groups[self.rank :: self.world_size])
        keep = [k for k, i in enumerate(take.indexes) if i // n in mine]
        return Take([take.indexes[k] for k in keep], [take.units[k] for k in keep])

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on the next batch; every rank must call it. Returns global metrics."""
        t0 = time.perf_counter()
        take, dropped = self._claim(step)
        t_wait = time.perf_counter() - t0
        table = self.store.fetch(self.partition, self._my_share(take), TRAIN_FIELDS)
        batch = self._tensors(table)
        stats = self._optimize(batch)
        self.version = step + 1
        m = self._reduce_metrics(batch, stats, step)
        m["time/wait_batch_s"] = t_wait
        m["staleness/dropped_groups"] = dropped
        m["time/step_s"] = time.perf_counter() - t0
        return m

    def _tensors(self, table: pa.Table) -> dict[str, torch.Tensor]:
        """Right-padded prompt+response ids with the response mask, rollout logprobs and advantages."""
        cols = table.to_pydict()
        seqs = [p + r for p, r in zip(cols["prompt_ids"], cols["response_ids"])]
        width = max(len(s) for s in seqs)
        b = len(seqs)
        ids = torch.zeros(b, width, dtype=torch.long)
        attn = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width - 1)  # position t predicts token t + 1
        behaviour = torch.zeros(b, width - 1)
        for i, (p, r, lp) in enumerate(zip(cols["prompt_ids"], cols["response_ids"], cols["logprobs"])):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            attn[i, : len(p) + len(r)] = 1
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1
            behaviour[i, len(p) - 1 : len(p) - 1 + len(lp)] = torch.tensor(lp)
        rewards = torch.tensor(cols["reward"], dtype=torch.float32)
        group_ids = torch.tensor(cols["group"])
        a = self.recipe.algorithm
        adv = self.adv_fn(algorithms.AdvantageInputs(rewards, group_ids, mask),
                          algorithms.AdvantageConfig(std_normalize=a.std_normalize), None).advantages
        return {"ids": ids, "attn": attn, "mask": mask, "behaviour": behaviour, "rewards": rewards,
                "adv": adv, "versions": torch.tensor(cols["version"]),
                "resp_len": torch.tensor([len(r) for r in cols["response_ids"]], dtype=torch.float32)}

    def _logprobs(self, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position logprob of the next token (temperature-scaled like the sampler) and entropy."""
        logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[:, :-1].float()
        logits = logits / self.recipe.rollout.temperature
        logp = torch.log_softmax(logits, dim=-1)
        target = ids[:, 1:].to(self.device)
        token_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return token_lp, entropy

    def _optimize(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        mask = batch["mask"].to(self.device)
        local = torch.tensor([mask.sum().item(), float(mask.shape[0])])
        dist.all_reduce(local)
        denom = local[0].item() if self.recipe.algorithm.loss_agg == "token-mean" else local[1].item()
        logprobs, entropy = self._logprobs(batch["ids"], batch["attn"])
        inputs = algorithms.LossInputs(
            logprobs=logprobs, proximal_logprobs=logprobs.detach(),  # one update per batch: proximal = current
            behaviour_logprobs=batch["behaviour"].to(self.device), advantages=batch["adv"].to(self.device), mask=mask)
        loss, stats = self.loss_fn(inputs, self.loss_cfg, denom=denom)
        # FSDP averages gradients over ranks; the loss is a global mean, so undo that average
        (loss * self.world_size).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.trainer.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        with torch.no_grad():
            m = mask.bool()
            stats["entropy_sum"] = entropy.detach()[m].sum().item()
            stats["loss"] = loss.item()
            stats["grad_norm"] = float(grad_norm)
        return stats

    def _reduce_metrics(self, batch: dict[str, torch.Tensor], stats: dict[str, float], step: int) -> dict[str, float]:
        """Sums over ranks, then means over the global batch."""
        stale = (step - batch["versions"]).float()
        tokens = batch["mask"].sum().item()
        vec = torch.tensor([
            batch["rewards"].sum().item(), float(len(batch["rewards"])), batch["resp_len"].sum().item(), tokens,
            stats["entropy_sum"], stats["kl_behaviour"] * tokens, stats["clip_frac"] * tokens,
            stats["ratio_mean"] * tokens, stats["behaviour_weight_mean"] * tokens, stale.sum().item(),
            (batch["rewards"] ** 2).sum().item(),
        ], dtype=torch.float64)
        dist.all_reduce(vec)
        mx = torch.tensor([stale.max().item(), stats["ratio_max"]], dtype=torch.float64)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        n, tok = vec[1].item(), max(vec[3].item(), 1.0)
        mean_r = vec[0].item() / n
        return {
            "step": step, "version": self.version, "samples": n, "tokens": vec[3].item(),
            "reward/mean": mean_r, "reward/std": math.sqrt(max(vec[10].item() / n - mean_r**2, 0.0)),
            "response/len_mean": vec[2].item() / n,
            "actor/loss": stats["loss"], "actor/grad_norm": stats["grad_norm"], "actor/entropy": vec[4].item() / tok,
            "actor/kl_behaviour": vec[5].item() / tok, "actor/clip_frac": vec[6].item() / tok,
            "actor/ratio_mean": vec[7].item() / tok, "actor/ratio_max": mx[1].item(),
            "actor/behaviour_weight_mean": vec[8].item() / tok,
            "staleness/mean": vec[9].item() / n, "staleness/max": mx[0].item(),
        }

    # ------------------------------------------------------------------ weights
    def send_weights(self) -> WeightHandle | None:
        """Gather full tensors from the shards (a collective: every rank calls) and, on rank 0, write
        them to the weight channel. Returns the handle on rank 0, None elsewhere."""
        full: list[tuple[str, torch.Tensor]] = []
        for name, tensor in self.model.state_dict().items():
            t = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            if self.rank == 0:
                full.append((name, t.to("cpu", copy=False)))
        if self.rank != 0:
            return None
        assert self.sender is not None
        return self.sender.send(full, self.version)

    def release_weights(self, handle: WeightHandle) -> None:
        if self.sender is not None:
            self.sender.release(handle)

    def sequence_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """The trainer's logprob of each token given those before it (None for the first); a collective."""
        self.model.eval()
        ids = torch.tensor([token_ids])
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device)).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None].to(self.device)).squeeze(-1)
        return [None] + lp.cpu().tolist()

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (each becomes one FSDP2 unit)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


TrainerActor = ray.remote(num_cpus=1)(TrainerWorker)
