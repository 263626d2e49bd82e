"""RL algorithms as pure functions on tensors, looked up by name; the trainer knows none by heart.

Shapes: B samples, T response tokens (right-padded), `mask` is 1 on tokens that count in the loss.
Groups are given by `group_ids` (B,): samples of one prompt share an id.

Three registries, each a dict from the recipe's name to a function:
- `ADVANTAGES` (`algorithm.advantage`): `fn(AdvantageInputs, AdvantageConfig, reduce) -> Advantages`.
  `reduce` sums a tensor over every trainer rank (identity on one rank) for estimators that normalise over
  the global batch (REINFORCE++, whitened GAE); group estimators never need it because a rank holds whole
  groups. `needs_values(name)` says whether an estimator wants a critic.
- `POLICY_LOSSES` (`algorithm.policy_loss`): `fn(LossInputs, LossConfig, denom) -> (loss, stats)`, the
  loss aggregated as `LossConfig.loss_agg` says (`aggregate`); `denom` comes from `aggregate_denominator`
  over the whole mini-batch, so micro-batch losses add up to the mini-batch's.
- KL estimators k1/k2/k3 (`kl_estimate`), usable in the loss (`kl_coef`) or as reward shaping
  (`kl_reward_coef` -> `kl_token_rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over every trainer rank
Stats = dict[str, torch.Tensor]  # 0-dim detached tensors: a loss's diagnostics, read without a device sync


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# ---------------------------------------------------------------- outcome advantages (one scalar per sample)

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

    A group whose rewards are all equal gets zero advantage (no signal), not a division by zero. A group
    of one sample (rollout.group_size = 1) has no baseline: its advantage is the raw reward, as in verl.
    """
    mean, std, n = _group_stats(rewards, group_ids)
    alone = n < 2
    adv = torch.where(alone, rewards, rewards - mean)
    return torch.where(alone, adv, adv / (std + eps)) if std_normalize else adv


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = False,
                    eps: float = 1e-6) -> torch.Tensor:
    """RLOO: reward minus the mean of the *other* samples of its group (leave-one-out baseline), divided
    by the group's reward std when `std_normalize`. A group of one sample gets its raw reward (as GRPO)."""
    mean, std, n = _group_stats(rewards, group_ids)
    alone = n < 2
    adv = torch.where(alone, rewards, rewards - (mean * n - rewards) / (n - 1).clamp(min=1))
    return torch.where(alone, adv, adv / (std + eps)) if std_normalize else adv


# ---------------------------------------------------------------- token rewards, returns, GAE

def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) token rewards holding each sample's outcome reward on its last counted token, zero elsewhere.
    A sample with no counted token gets nothing."""
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(dim=1).values  # (B,), -1 if none
    out = torch.zeros_like(mask, dtype=rewards.dtype)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    out[rows, last[rows]] = rewards[rows]
    return out


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over the counted tokens of each row (masked tokens are skipped: a
    tool turn inside a response passes the return through undiscounted and earns nothing itself)."""
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t]
        running = torch.where(m > 0, token_rewards[:, t] + gamma * running, running)
        out[:, t] = running * m
    return out


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the counted tokens of each row.

    delta_t = r_t + gamma * V_{t'} - V_t, where t' is the next counted token (V = 0 past the last one:
    the episode ends there), and A_t = delta_t + gamma * lam * A_{t'}. Returns (advantages, returns =
    advantages + values), both zero off the mask.
    """
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        next_adv = torch.where(m, a, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
    return adv, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce | None = None, eps: float = 1e-6,
                  shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the counted entries of the *global* batch (`reduce` sums over ranks).
    Zero off the mask. A batch whose entries are all equal comes out zero (or unchanged if not
    `shift_mean`), not NaN."""
    reduce = reduce or _identity
    m = mask.to(x.dtype)
    sums = reduce(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double())
    n = sums[2].clamp(min=1)
    mean = sums[0] / n
    var = (sums[1] / n - mean**2).clamp(min=0)
    if sums[2] > 1:
        var = var * sums[2] / (sums[2] - 1)  # unbiased
    centred = x - mean.to(x.dtype) if shift_mean else x
    return centred / (var.sqrt().to(x.dtype) + eps) * m


def kl_token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, coef: float,
                     kind: str = "k1") -> torch.Tensor:
    """KL penalty as reward shaping: -coef * KL_t(pi || ref) on every counted token."""
    return -coef * kl_estimate(logprobs, ref_logprobs, kind) * mask


# ---------------------------------------------------------------- registered advantage estimators

@dataclass
class AdvantageInputs:
    rewards: torch.Tensor  # (B,) outcome reward of each sample
    group_ids: torch.Tensor  # (B,) samples of one prompt share an id
    mask: torch.Tensor  # (B, T) float, 1 on tokens that count
    token_rewards: Optional[torch.Tensor] = None  # (B, T) shaping added per token (e.g. kl_token_rewards)
    values: Optional[torch.Tensor] = None  # (B, T) critic values V(s_t), for estimators that need them


@dataclass
class AdvantageConfig:
    std_normalize: bool = True  # grpo/rloo: divide by the group's reward std
    gamma: float = 1.0  # discount (reinforce_pp, gae)
    lam: float = 1.0  # GAE lambda
    whiten: bool = True  # gae: normalise advantages over the global batch
    eps: float = 1e-6


@dataclass
class Advantages:
    advantages: torch.Tensor  # (B, T), zero off the mask
    returns: Optional[torch.Tensor] = None  # (B, T) value targets, for estimators with a critic


def _outcome(x: AdvantageInputs) -> torch.Tensor:
    """The scalar a group estimator normalises: the outcome reward plus the sample's summed shaping."""
    if x.token_rewards is None:
        return x.rewards
    return x.rewards + (x.token_rewards * x.mask).sum(-1)


def grpo_estimator(x: AdvantageInputs, cfg: AdvantageConfig, reduce: Reduce | None = None) -> Advantages:
    adv = grpo_advantages(_outcome(x), x.group_ids, cfg.std_normalize, cfg.eps)
    return Advantages(adv[:, None] * x.mask)


def rloo_estimator(x: AdvantageInputs, cfg: AdvantageConfig, reduce: Reduce | None = None) -> Advantages:
    adv = rloo_advantages(_outcome(x), x.group_ids, cfg.std_normalize, cfg.eps)
    return Advantages(adv[:, None] * x.mask)


def _token_rewards(x: AdvantageInputs, outcome: torch.Tensor) -> torch.Tensor:
    r = outcome_token_rewards(outcome, x.mask)
    return r if x.token_rewards is None else r + x.token_rewards * x.mask


def reinforce_pp_estimator(x: AdvantageInputs, cfg: AdvantageConfig, reduce: Reduce | None = None) -> Advantages:
    """REINFORCE++: token returns of the outcome reward plus per-token shaping (e.g. -beta * KL), then
    normalised over every counted token of the global batch (no critic, no group baseline)."""
    returns = discounted_returns(_token_rewards(x, x.rewards), x.mask, cfg.gamma)
    return Advantages(masked_whiten(returns, x.mask, reduce, cfg.eps))


def reinforce_pp_baseline_estimator(x: AdvantageInputs, cfg: AdvantageConfig,
                                    reduce: Reduce | None = None) -> Advantages:
    """REINFORCE++ with a group-mean baseline subtracted from the outcome first (for groups of samples)."""
    centred = grpo_advantages(x.rewards, x.group_ids, std_normalize=False)
    returns = discounted_returns(_token_rewards(x, centred), x.mask, cfg.gamma)
    return Advantages(masked_whiten(returns, x.mask, reduce, cfg.eps))


def gae_estimator(x: AdvantageInputs, cfg: AdvantageConfig, reduce: Reduce | None = None) -> Advantages:
    """GAE with a critic: token rewards (outcome on the last token + shaping), values from the critic."""
    if x.values is None:
        raise ValueError("the 'gae' advantage estimator needs critic values (AdvantageInputs.values)")
    adv, returns = gae(_token_rewards(x, x.rewards), x.values * x.mask, x.mask, cfg.gamma, cfg.lam)
    if cfg.whiten:
        adv = masked_whiten(adv, x.mask, reduce, cfg.eps)
    return Advantages(adv, returns)


AdvantageFn = Callable[[AdvantageInputs, AdvantageConfig, Optional[Reduce]], Advantages]

ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo_estimator,
    "rloo": rloo_estimator,
    "reinforce_pp": reinforce_pp_estimator,
    "reinforce_pp_baseline": reinforce_pp_baseline_estimator,
    "gae": gae_estimator,
}
_NEEDS_VALUES = {"gae"}


def needs_values(advantage: str) -> bool:
    """Whether the named estimator needs a critic's values."""
    return advantage in _NEEDS_VALUES


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
    ref_logprobs: Optional[torch.Tensor] = None  # (B, T) KL reference for kl_coef; None: the behaviour policy
    entropy: Optional[torch.Tensor] = None  # (B, T) policy entropy per position, with grad, for entropy_coef


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    behaviour_weight_cap: float = 2.0
    loss_agg: str = "token-mean"  # one of LOSS_AGGREGATIONS
    kl_coef: float = 0.0  # KL(pi || ref) as a loss term
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0  # entropy bonus: subtracts coef * entropy per token
    clip_ratio_c: float = 3.0  # dual clip: a negative-advantage token's loss is at most -c * A; 0 = off
    behaviour_cap_mode: str = "clamp"  # clamp | mask, see behaviour_weight


LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
BEHAVIOUR_CAP_MODES = ("clamp", "mask")


def aggregate_denominator(how: str, tokens: float | torch.Tensor, samples: float,
                          horizon: float) -> float | torch.Tensor:
    """What `aggregate` divides a batch's loss sum by: its counted tokens (token-mean), its samples
    (seq-mean, seq-mean-token-sum), or samples * horizon (seq-mean-token-sum-norm, Dr. GRPO: every sample's
    token sum over the same constant, the longest response allowed). Computed from the counts of a whole
    mini-batch (every rank, every micro-batch), it makes the micro-batches' losses add up to the
    mini-batch's aggregate however the batch is split."""
    if how not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {how!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    if how == "token-mean":
        return tokens
    return samples * horizon if how == "seq-mean-token-sum-norm" else samples


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, denom: float | None = None) -> torch.Tensor:
    """token-mean: mean over every counted token of the batch; seq-mean: mean over samples of each
    sample's token mean; seq-mean-token-sum: mean over samples of each sample's token sum;
    seq-mean-token-sum-norm: the same divided by a constant horizon. `denom` (aggregate_denominator of the
    global mini-batch) replaces this batch's own; without it the horizon is the padded width."""
    if how not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {how!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    if how == "seq-mean":
        total = ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    else:
        total = (values * mask).sum()
    if denom is None:
        denom = aggregate_denominator(how, mask.sum().clamp(min=1), max(mask.shape[0], 1), mask.shape[-1])
    return total / denom


def _token_advantages(x: LossInputs) -> torch.Tensor:
    return x.advantages if x.advantages.dim() == 2 else x.advantages[:, None].expand_as(x.logprobs)


def clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, cfg: LossConfig,
                      dual_clip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A). With dual clip
    (`cfg.clip_ratio_c` > 0, Ye et al. 2020) a token with A < 0 loses at most -c A, so one very unlikely
    token with a large ratio cannot dominate the batch. Returns (loss, ratio clipped, token dual-clipped)."""
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = torch.maximum(-ratio * adv, -clipped * adv)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip and cfg.clip_ratio_c > 0:
        cap = -adv * cfg.clip_ratio_c
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
    return loss, ratio != clipped, dual


def behaviour_weight(x: LossInputs, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance weight proximal/behaviour of each token (no grad) and the tokens the cap dropped.

    clamp: the weight is min(w, cap). mask (AReaL): a token with w > cap gets weight 0, so its
    policy-gradient term leaves the loss; it stays in the denominator (as in AReaL: the count is the
    mini-batch's counted tokens, known before any forward) and in the KL and entropy terms.
    """
    w = torch.exp(x.proximal_logprobs - x.behaviour_logprobs).detach()
    if cfg.behaviour_cap_mode == "clamp":
        return w.clamp(max=cfg.behaviour_weight_cap), torch.zeros_like(w, dtype=torch.bool)
    if cfg.behaviour_cap_mode == "mask":
        over = w > cfg.behaviour_weight_cap
        return torch.where(over, torch.zeros_like(w), w), over
    raise ValueError(f"unknown behaviour_cap_mode {cfg.behaviour_cap_mode!r}; valid: {', '.join(BEHAVIOUR_CAP_MODES)}")


def _masked_frac(flags: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (flags.to(mask.dtype) * mask).sum() / n


def _weighted_loss(pg: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, dual: torch.Tensor,
                   x: LossInputs, cfg: LossConfig, denom: float | None) -> tuple[torch.Tensor, Stats]:
    """The policy-gradient loss `pg` times the behaviour weight, plus the KL and entropy terms, aggregated;
    with the diagnostics every policy loss reports."""
    weight, dropped = behaviour_weight(x, cfg)
    per_token = pg * weight
    ref = x.behaviour_logprobs if x.ref_logprobs is None else x.ref_logprobs
    kl = kl_estimate(x.logprobs, ref, cfg.kl_estimator)
    if cfg.kl_coef:
        per_token = per_token + cfg.kl_coef * kl
    if cfg.entropy_coef:
        if x.entropy is None:
            raise ValueError("entropy_coef > 0 needs LossInputs.entropy (per-token entropy with grad)")
        per_token = per_token - cfg.entropy_coef * x.entropy
    loss = aggregate(per_token, x.mask, cfg.loss_agg, denom)
    with torch.no_grad():
        m = x.mask
        n = m.sum().clamp(min=1)
        stats = {  # 0-dim tensors (no device sync here); means over the counted tokens
            "ratio_mean": (ratio * m).sum() / n,
            "ratio_max": torch.where(m > 0, ratio, torch.ones_like(ratio)).max(),
            "clip_frac": _masked_frac(clipped, m, n),
            "dual_clip_frac": _masked_frac(dual, m, n),
            "behaviour_weight_mean": (weight * m).sum() / n,
            "behaviour_masked_frac": _masked_frac(dropped, m, n),
            "kl_behaviour": (kl_estimate(x.logprobs, x.behaviour_logprobs, cfg.kl_estimator) * m).sum() / n,
            "kl_ref": (kl * m).sum() / n,
        }
    return loss, stats


def decoupled_ppo_loss(x: LossInputs, cfg: LossConfig, denom: float | None = None) -> tuple[torch.Tensor, Stats]:
    """Decoupled PPO (AReaL): clip the ratio to the proximal policy; weight each token by the
    truncated ratio proximal/behaviour so that stale samples are corrected but cannot blow up.

    With on-policy data (behaviour == proximal) the weight is 1 and this is PPO-clip; clip_high >
    clip_low is DAPO's clip-higher; dual clip bounds negative-advantage tokens (clipped_objective).
    """
    ratio = torch.exp(x.logprobs - x.proximal_logprobs)
    pg, clipped, dual = clipped_objective(ratio, _token_advantages(x), cfg)
    return _weighted_loss(pg, ratio, clipped, dual, x, cfg, denom)


def ppo_clip_loss(x: LossInputs, cfg: LossConfig, denom: float | None = None) -> tuple[torch.Tensor, Stats]:
    """Plain PPO-clip against the behaviour policy (no proximal recompute correction)."""
    on_policy = LossInputs(x.logprobs, x.behaviour_logprobs, x.behaviour_logprobs, x.advantages, x.mask,
                           x.ref_logprobs, x.entropy)
    return decoupled_ppo_loss(on_policy, cfg, denom)


def gspo_loss(x: LossInputs, cfg: LossConfig, denom: float | None = None) -> tuple[torch.Tensor, Stats]:
    """GSPO (Zheng et al. 2025), in its token form: a sequence's importance ratio is the geometric mean
    of its tokens' ratios to the proximal policy, s = exp(mean_t(logp_t - prox_t)), clipped per sequence
    to [1 - clip_low, 1 + clip_high] (the paper uses about 3e-4 and 4e-4). Every token carries the value s
    with the gradient of its own logprob, s * exp(logp_t - sg(logp_t)); averaged per sequence
    (loss_agg seq-mean) the gradient is GSPO's, -A * grad s. No dual clip; the behaviour weight, KL and
    entropy terms are those of decoupled_ppo.
    """
    m = x.mask
    seq_log_ratio = ((x.logprobs - x.proximal_logprobs) * m).sum(-1) / m.sum(-1).clamp(min=1)
    ratio = torch.exp(seq_log_ratio.detach()[:, None] + x.logprobs - x.logprobs.detach())
    pg, clipped, dual = clipped_objective(ratio, _token_advantages(x), cfg, dual_clip=False)
    return _weighted_loss(pg, ratio, clipped, dual, x, cfg, denom)


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Stats]]] = {
    "decoupled_ppo": decoupled_ppo_loss,
    "ppo_clip": ppo_clip_loss,
    "gspo": gspo_loss,
}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- critic

def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, how: str = "token-mean", denom: float | None = None
               ) -> tuple[torch.Tensor, Stats]:
    """Clipped value loss (PPO): 0.5 * max((V - R)^2, (V_clip - R)^2), where V_clip keeps the new value
    within `clip` of the value before the update; `clip` <= 0 is the plain squared error."""
    err = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(err, err_clipped)
    else:
        err_clipped = err
        per_token = 0.5 * err
    loss = aggregate(per_token, mask, how, denom)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {  # 0-dim tensors; means over the counted tokens
            "value_mean": (values * mask).sum() / n,
            "value_clip_frac": ((err_clipped > err).to(mask.dtype) * mask).sum() / n,
            "value_error": (err * mask).sum() / n,
        }
    return loss, stats
