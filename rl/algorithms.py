"""RL algorithms as pure functions on tensors, looked up by name; the trainer knows none by heart.

Shapes: B samples, T response tokens (right-padded), `mask` is 1 on tokens that count in the loss.
Groups are given by `group_ids` (B,): samples of one prompt share an id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


# ---------------------------------------------------------------- advantages (one scalar per sample)

def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample mean, unbiased std and size of the sample's group."""
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    n = torch.zeros(len(uniq), dtype=rewards.dtype).index_add_(0, inv, torch.ones_like(rewards))
    s = torch.zeros(len(uniq), dtype=rewards.dtype).index_add_(0, inv, rewards)
    mean = s / n
    sq = torch.zeros(len(uniq), dtype=rewards.dtype).index_add_(0, inv, (rewards - mean[inv]) ** 2)
    std = torch.sqrt(sq / (n - 1).clamp(min=1))
    return mean[inv], std[inv], n[inv]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: reward minus its group's mean, divided by the group's std when `std_normalize`.

    A group whose rewards are all equal gets zero advantage (no signal), not a division by zero.
    """
    mean, std, _ = _group_stats(rewards, group_ids)
    adv = rewards - mean
    return adv / (std + eps) if std_normalize else adv


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = False,
                    eps: float = 1e-6) -> torch.Tensor:
    """RLOO: reward minus the mean of the *other* samples of its group (leave-one-out baseline)."""
    mean, _, n = _group_stats(rewards, group_ids)
    loo = (mean * n - rewards) / (n - 1).clamp(min=1)
    return torch.where(n > 1, rewards - loo, torch.zeros_like(rewards))


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {"grpo": grpo_advantages, "rloo": rloo_advantages}


# ---------------------------------------------------------------- KL estimators (per token)

def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = ref_logprobs - logprobs  # log(ref / pi)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")


# ---------------------------------------------------------------- policy losses

@dataclass
class LossInputs:
    logprobs: torch.Tensor  # (B, T) current policy, with grad
    proximal_logprobs: torch.Tensor  # (B, T) policy at the start of this step (recomputed, no grad)
    behaviour_logprobs: torch.Tensor  # (B, T) policy that sampled the tokens (rollout engine)
    advantages: torch.Tensor  # (B,) or (B, T)
    mask: torch.Tensor  # (B, T) float, 1 where the token counts


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    behaviour_weight_cap: float = 2.0
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, denom: float | None = None) -> torch.Tensor:
    """token-mean: mean over every counted token of the batch; seq-mean: mean over samples of each
    sample's token mean. `denom` replaces the token (or sample) count, for a global mean across ranks."""
    if how == "token-mean":
        return (values * mask).sum() / (denom if denom is not None else mask.sum().clamp(min=1))
    if how == "seq-mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / (denom if denom is not None else max(len(per_seq), 1))
    raise ValueError(f"unknown loss aggregation {how!r}; valid: token-mean, seq-mean")


def decoupled_ppo_loss(x: LossInputs, cfg: LossConfig, denom: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO (AReaL): clip the ratio to the proximal policy; weight each token by the
    truncated ratio proximal/behaviour so that stale samples are corrected but cannot blow up.

    With on-policy data (behaviour == proximal) the weight is 1 and this is PPO-clip; clip_high >
    clip_low is DAPO's clip-higher.
    """
    adv = x.advantages if x.advantages.dim() == 2 else x.advantages[:, None].expand_as(x.logprobs)
    ratio = torch.exp(x.logprobs - x.proximal_logprobs)
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    weight = torch.exp(x.proximal_logprobs - x.behaviour_logprobs).clamp(max=cfg.behaviour_weight_cap).detach()
    per_token = pg * weight
    kl = kl_estimate(x.logprobs, x.behaviour_logprobs, cfg.kl_estimator)
    if cfg.kl_coef:
        per_token = per_token + cfg.kl_coef * kl
    loss = aggregate(per_token, x.mask, cfg.loss_agg, denom)
    with torch.no_grad():
        m = x.mask.bool()
        n = m.sum().clamp(min=1)
        stats = {
            "ratio_mean": (ratio[m].sum() / n).item(),
            "ratio_max": ratio[m].max().item() if m.any() else 1.0,
            "clip_frac": (((ratio != clipped) & m).sum() / n).item(),
            "behaviour_weight_mean": (weight[m].sum() / n).item(),
            "kl_behaviour": (kl[m].sum() / n).item(),
        }
    return loss, stats


def ppo_clip_loss(x: LossInputs, cfg: LossConfig, denom: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain PPO-clip against the behaviour policy (no proximal recompute correction)."""
    on_policy = LossInputs(x.logprobs, x.behaviour_logprobs, x.behaviour_logprobs, x.advantages, x.mask)
    return decoupled_ppo_loss(on_policy, cfg, denom)


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict[str, float]]]] = {
    "decoupled_ppo": decoupled_ppo_loss,
    "ppo_clip": ppo_clip_loss,
}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
