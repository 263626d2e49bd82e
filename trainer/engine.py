"""PolicyTrainer: one rank's half of a training step, without Ray or the data store.

    score    (no grad, only when needed) proximal logprobs, reference logprobs, critic values
    advantages  looked up by name in rl.core.algorithms; global statistics are summed over ranks
    update   for each PPO mini-batch: micro-batches (token budget) -> loss -> backward, then clip and step

TrainerWorker (the Ray actor) feeds it samples from the data store; `streamrl bench trainer` feeds it
synthetic samples, so the benchmark times exactly this code. Every rank calls `train` with its own samples;
the collectives inside (FSDP's, the micro-batch count agreement, the sums) line up because every rank
runs the same sequence of them.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from rl.core import algorithms
from rl.core.config import Recipe, TrainerConfig, max_response_tokens
from trainer.batching import MicroBatch, Sample, collate, pad_stack, padded_tokens, plan_micro_batches, split_mini_batches
from trainer.critic import build_critic, response_values
from trainer.model import (ModelSource, build_policy, build_reference, logprobs_and_entropy, pad_multiple,
                           response_logits, token_logprobs)


def lr_lambda(cfg: TrainerConfig) -> Callable[[int], float]:
    """Multiplier of `lr` at a step: linear warmup, then constant or cosine down to `min_lr_ratio`."""
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class _Sums:
    """Per-step metric sums kept on the device (no sync per micro-batch); reduced over ranks at the end."""

    KEYS = ("tokens", "entropy", "kl_behaviour", "kl_ref", "clip", "dual_clip", "ratio", "weight", "masked", "loss",
            "value_loss", "value_mean", "value_clip", "value_error", "kl_reward", "micro_batches", "computed_tokens",
            "real_tokens")

    def __init__(self, device: torch.device) -> None:
        self.v = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.ratio_max = torch.ones((), dtype=torch.float64, device=device)

    def add(self, **kw: torch.Tensor | float) -> None:
        for k, x in kw.items():
            self.v[self.KEYS.index(k)] += x.detach().double() if isinstance(x, torch.Tensor) else x


class PolicyTrainer:
    def __init__(self, recipe: Recipe, source: ModelSource, device: torch.device, pad_id: int = 0) -> None:
        self.recipe, self.device, self.pad_id = recipe, device, pad_id
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        t, a = recipe.trainer, recipe.algorithm
        torch.manual_seed(recipe.seed)
        self.model = build_policy(source, t, device, recipe.seed, recipe.model.lora)
        # with LoRA only the adapters train: the frozen base has no gradients and no AdamW moments
        self.optim = torch.optim.AdamW(_trained(self.model), lr=t.lr, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optim, lr_lambda(t))
        self.critic = self.critic_optim = self.critic_sched = None
        if algorithms.needs_values(a.advantage):
            self.critic = build_critic(source, t, device, recipe.seed)
            self.critic_optim = torch.optim.AdamW(self.critic.parameters(), lr=t.critic_lr, weight_decay=t.weight_decay)
            self.critic_sched = torch.optim.lr_scheduler.LambdaLR(self.critic_optim, lr_lambda(t))
        self.reference = None
        if a.kl_reference == "initial" and (a.kl_coef > 0 or a.kl_reward_coef > 0):
            self.reference = build_reference(source, t, device, recipe.seed)
        self.loss_fn = algorithms.POLICY_LOSSES[a.policy_loss]
        self.adv_fn = algorithms.ADVANTAGES[a.advantage]
        self.loss_cfg = algorithms.LossConfig(
            clip_low=a.clip_low, clip_high=a.clip_high, behaviour_weight_cap=a.behaviour_weight_cap, loss_agg=a.loss_agg,
            kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef, clip_ratio_c=a.clip_ratio_c,
            behaviour_cap_mode=a.behaviour_cap_mode)
        self.adv_cfg = algorithms.AdvantageConfig(a.std_normalize, a.gamma, a.gae_lambda, a.gae_whiten)
        self.version = 0
        self.multiple = pad_multiple(t.pad_multiple, device)

    # ------------------------------------------------------------------ collectives
    def _allsum(self, t: torch.Tensor) -> torch.Tensor:
        buf = t.to(self.device, torch.float64)
        dist.all_reduce(buf)
        return buf.to(t.device, t.dtype)

    def _plan(self, samples: list[Sample], indexes: list[int]) -> list[list[int]]:
        """This rank's micro-batches of `indexes`, padded with empty ones to the count of the busiest rank."""
        t = self.recipe.trainer
        local = plan_micro_batches([samples[i].length for i in indexes], t.micro_batch_tokens, t.micro_batch_size,
                                   t.packing, self.multiple)
        local = [[indexes[j] for j in b] for b in local]
        count = torch.tensor([len(local)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return local + [[] for _ in range(int(count.item()) - len(local))]

    def _collate(self, samples: list[Sample], index: list[int]) -> MicroBatch:
        return collate(samples, index, self.recipe.trainer.packing, self.pad_id, self.multiple).to(self.device)

    # ------------------------------------------------------------------ the step
    def train(self, samples: list[Sample], step: int) -> dict[str, float]:
        """One step (one policy version) on this rank's samples; returns metrics over every rank's samples."""
        t0 = time.perf_counter()
        self.model.train()
        sums = _Sums(self.device)
        scores = self._score(samples)
        t1 = time.perf_counter()
        adv, returns = self._advantages(samples, scores, sums)
        norms = []
        for part in split_mini_batches(len(samples), self.recipe.trainer.mini_batches):
            norms.append(self._update(samples, part, scores, adv, returns, sums))
        lr = self.sched.get_last_lr()[0]
        self.sched.step()
        if self.critic_sched is not None:
            self.critic_sched.step()
        self.version = step + 1
        t2 = time.perf_counter()
        m = self._metrics(samples, sums, step, norms)
        m.update({"actor/lr": lr, "time/score_s": t1 - t0, "time/update_s": t2 - t1,
                  "perf/train_tokens_per_s": m["trainer/real_tokens"] / max(t2 - t0, 1e-9)})
        return m

    def _score(self, samples: list[Sample]) -> dict[str, list[torch.Tensor]]:
        """No-grad passes before any update: proximal logprobs (needed when several updates share the
        batch, or for the KL reward), reference logprobs, critic values. Per sample, response-aligned."""
        a, t = self.recipe.algorithm, self.recipe.trainer
        wanted = {"prox": t.mini_batches > 1 or a.kl_reward_coef > 0, "ref": self.reference is not None,
                  "values": self.critic is not None}
        out: dict[str, list[torch.Tensor]] = {k: [torch.empty(0)] * len(samples) for k, on in wanted.items() if on}
        if not out:
            return out
        temp = self.recipe.rollout.temperature
        with torch.no_grad():
            for index in self._plan(samples, list(range(len(samples)))):
                mb = self._collate(samples, index)
                got = {}
                if "prox" in out:
                    got["prox"] = token_logprobs(response_logits(self.model, mb, temp), mb.targets)
                if "ref" in out:
                    got["ref"] = token_logprobs(response_logits(self.reference, mb, temp), mb.targets)
                if "values" in out:
                    got["values"] = response_values(self.critic, mb)
                for name, tensor in got.items():
                    rows = tensor.cpu()
                    for k, i in enumerate(mb.index):
                        out[name][i] = rows[k, : len(samples[i].response_ids)]
        return out

    def _advantages(self, samples: list[Sample], scores: dict[str, list[torch.Tensor]],
                    sums: _Sums) -> tuple[list[torch.Tensor], Optional[list[torch.Tensor]]]:
        a = self.recipe.algorithm
        mask = pad_stack([s.loss_mask for s in samples])
        width = mask.shape[1]
        token_rewards = None
        if a.kl_reward_coef > 0:
            ref = scores["ref"] if "ref" in scores else [s.behaviour for s in samples]
            token_rewards = algorithms.kl_token_rewards(pad_stack(scores["prox"], width), pad_stack(ref, width), mask,
                                                        a.kl_reward_coef, a.kl_estimator)
            sums.add(kl_reward=token_rewards.sum())
        values = pad_stack(scores["values"], width) if "values" in scores else None
        x = algorithms.AdvantageInputs(torch.tensor([s.reward for s in samples]), torch.tensor([s.group for s in samples]),
                                       mask, token_rewards, values)
        out = self.adv_fn(x, self.adv_cfg, self._allsum)
        lengths = [len(s.response_ids) for s in samples]
        adv = [out.advantages[i, :n] for i, n in enumerate(lengths)]
        returns = None if out.returns is None else [out.returns[i, :n] for i, n in enumerate(lengths)]
        return adv, returns

    def _update(self, samples: list[Sample], part: list[int], scores: dict[str, list[torch.Tensor]],
                adv: list[torch.Tensor], returns: Optional[list[torch.Tensor]], sums: _Sums) -> tuple[float, float]:
        """One optimizer update on the samples `part`: accumulate over micro-batches, clip, step.
        Returns the policy's and the critic's gradient norms before clipping."""
        t, a = self.recipe.trainer, self.recipe.algorithm
        counts = self._allsum(torch.tensor([sum(float(samples[i].loss_mask.sum()) for i in part), float(len(part))],
                                           dtype=torch.float64))
        denom = max(algorithms.aggregate_denominator(a.loss_agg, float(counts[0]), float(counts[1]),
                                                     max_response_tokens(self.recipe)), 1.0)
        behaviour = [s.behaviour for s in samples]
        plan = self._plan(samples, part)
        sums.add(micro_batches=len(plan), real_tokens=sum(samples[i].length for i in part),
                 computed_tokens=padded_tokens([s.length for s in samples], plan, t.packing, self.multiple))
        self.optim.zero_grad(set_to_none=True)
        if self.critic_optim is not None:
            self.critic_optim.zero_grad(set_to_none=True)
        for index in plan:
            mb = self._collate(samples, index)
            logits = response_logits(self.model, mb, self.recipe.rollout.temperature)
            logprobs, ent = logprobs_and_entropy(logits, mb.targets, entropy_grad=a.entropy_coef > 0)
            del logits  # the log-softmax keeps what backward needs
            inputs = algorithms.LossInputs(
                logprobs=logprobs,
                proximal_logprobs=mb.field(scores["prox"]) if "prox" in scores else logprobs.detach(),
                behaviour_logprobs=mb.field(behaviour), advantages=mb.field(adv), mask=mb.mask,
                ref_logprobs=mb.field(scores["ref"]) if "ref" in scores else None,
                entropy=ent if a.entropy_coef > 0 else None)
            loss, stats = self.loss_fn(inputs, self.loss_cfg, denom=denom)
            # FSDP averages gradients over ranks; the loss is already a global mean, so undo that average
            (loss * self.world_size).backward()
            n = mb.mask.sum()
            sums.add(tokens=n, entropy=(ent.detach() * mb.mask).sum(), kl_behaviour=stats["kl_behaviour"] * n,
                     kl_ref=stats["kl_ref"] * n, clip=stats["clip_frac"] * n, dual_clip=stats["dual_clip_frac"] * n,
                     ratio=stats["ratio_mean"] * n, weight=stats["behaviour_weight_mean"] * n,
                     masked=stats["behaviour_masked_frac"] * n, loss=loss)
            sums.ratio_max = torch.maximum(sums.ratio_max, stats["ratio_max"].double())
            if self.critic is not None:
                self._critic_micro_batch(mb, scores, returns, denom, sums)
        norm = _clip(_trained(self.model), t.max_grad_norm)
        self.optim.step()
        critic_norm = 0.0
        if self.critic_optim is not None:
            critic_norm = _clip(self.critic.parameters(), t.max_grad_norm)
            self.critic_optim.step()
        return norm, critic_norm

    def _critic_micro_batch(self, mb: MicroBatch, scores: dict[str, list[torch.Tensor]],
                            returns: Optional[list[torch.Tensor]], denom: float, sums: _Sums) -> None:
        a = self.recipe.algorithm
        assert self.critic is not None and returns is not None
        values = response_values(self.critic, mb)
        loss, stats = algorithms.value_loss(values, mb.field(scores["values"]), mb.field(returns), mb.mask,
                                            a.value_clip, a.loss_agg, denom)
        (loss * self.world_size).backward()
        n = mb.mask.sum()
        sums.add(value_loss=loss, value_mean=stats["value_mean"] * n, value_clip=stats["value_clip_frac"] * n,
                 value_error=stats["value_error"] * n)

    # ------------------------------------------------------------------ metrics
    def _metrics(self, samples: list[Sample], sums: _Sums, step: int, norms: list[tuple[float, float]]) -> dict[str, float]:
        """Sums over ranks, then means over the global batch (one all-reduce of sums, one of maxima)."""
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        stale = torch.tensor([step - s.version for s in samples], dtype=torch.float64)
        resp = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float64)
        head = torch.tensor([rewards.sum(), (rewards**2).sum(), len(samples), resp.sum(), stale.sum()],
                            dtype=torch.float64)
        local = torch.cat([head.to(self.device), sums.v])
        dist.all_reduce(local)
        mx = torch.stack([stale.max().to(self.device), sums.ratio_max])
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        g = dict(zip(("reward", "reward2", "samples", "resp", "stale", *_Sums.KEYS), local.cpu().tolist()))
        n, tok, k = g["samples"], max(g["tokens"], 1.0), len(norms)
        mean_r = g["reward"] / n
        m = {
            "step": step, "version": self.version, "samples": n, "tokens": g["tokens"],
            "reward/mean": mean_r, "reward/std": math.sqrt(max(g["reward2"] / n - mean_r**2, 0.0)),
            "response/len_mean": g["resp"] / n,
            "actor/loss": g["loss"] / k, "actor/grad_norm": sum(x[0] for x in norms) / k,
            "actor/entropy": g["entropy"] / tok, "actor/kl_behaviour": g["kl_behaviour"] / tok,
            "actor/kl_ref": g["kl_ref"] / tok, "actor/clip_frac": g["clip"] / tok, "actor/ratio_mean": g["ratio"] / tok,
            "actor/ratio_max": mx[1].item(), "actor/behaviour_weight_mean": g["weight"] / tok,
            "actor/dual_clip_frac": g["dual_clip"] / tok, "actor/behaviour_masked_frac": g["masked"] / tok,
            "staleness/mean": g["stale"] / n, "staleness/max": mx[0].item(),
            "trainer/micro_batches": g["micro_batches"] / self.world_size,
            "trainer/pad_fraction": 1.0 - g["real_tokens"] / max(g["computed_tokens"], 1.0),
            "trainer/real_tokens": g["real_tokens"],
        }
        if self.recipe.algorithm.kl_reward_coef > 0:
            m["actor/kl_reward"] = g["kl_reward"] / tok
        if self.critic is not None:
            m.update({"critic/value_loss": g["value_loss"] / k, "critic/value_mean": g["value_mean"] / tok,
                      "critic/clip_frac": g["value_clip"] / tok, "critic/value_error": g["value_error"] / tok,
                      "critic/grad_norm": sum(x[1] for x in norms) / k})
        return m

    # ------------------------------------------------------------------ inspection
    def sequence_logprobs(self, token_ids: list[int]) -> list[Optional[float]]:
        """The policy's logprob of each token given those before it (None for the first); a collective."""
        self.model.eval()
        ids = torch.tensor([token_ids], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        self.model.train()
        return [None] + lp.cpu().tolist()


def _trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _clip(params, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
