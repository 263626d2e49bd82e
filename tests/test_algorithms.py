import math

import pytest
import torch

from rl.core.algorithms import (ADVANTAGES, LOSS_AGGREGATIONS, POLICY_LOSSES, AdvantageConfig, AdvantageInputs,
                           LossConfig, LossInputs, aggregate, aggregate_denominator, decoupled_ppo_loss,
                           discounted_returns, gae, grpo_advantages, gspo_loss, kl_estimate, kl_token_rewards,
                           masked_whiten, needs_values, outcome_token_rewards, ppo_clip_loss, rloo_advantages,
                           value_loss)


def test_grpo_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo_advantages(r, g, std_normalize=True)
    # group 0: mean 0.5, unbiased std sqrt(1/3)
    std = math.sqrt(((0.5**2) * 4) / 3)
    assert adv[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std], rel=1e-4)
    assert adv[4:].tolist() == [0.0, 0.0]  # all-equal group: zero signal, no NaN


def test_grpo_without_std():
    adv = grpo_advantages(torch.tensor([3.0, 1.0]), torch.tensor([5, 5]), std_normalize=False)
    assert adv.tolist() == [1.0, -1.0]


def test_rloo_hand_computed():
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]))
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_estimate(lp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_estimate(lp, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    assert kl_estimate(lp, lp, "k3").item() == 0.0


def _inputs(lp, prox, beh, adv, mask):
    t = lambda x: torch.tensor(x, dtype=torch.float32)
    return LossInputs(t(lp), t(prox), t(beh), t(adv), t(mask))


def test_on_policy_loss_is_minus_mean_advantage():
    x = _inputs([[-1.0, -2.0, 0.0]], [[-1.0, -2.0, 0.0]], [[-1.0, -2.0, 0.0]], [2.0], [[1, 1, 0]])
    loss, stats = decoupled_ppo_loss(x, LossConfig())
    assert loss.item() == pytest.approx(-2.0)  # ratio 1, weight 1: -A averaged over the two real tokens
    assert stats["clip_frac"] == 0.0


def test_clipping_hand_computed():
    # ratio e^0.5 = 1.6487 > 1 + 0.2 with positive advantage: clipped to 1.2
    x = _inputs([[0.5]], [[0.0]], [[0.0]], [1.0], [[1]])
    loss, stats = decoupled_ppo_loss(x, LossConfig(clip_low=0.2, clip_high=0.2))
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clip_frac"] == 1.0
    # clip-higher: upper bound 1 + 0.28
    loss, _ = decoupled_ppo_loss(x, LossConfig(clip_low=0.2, clip_high=0.28))
    assert loss.item() == pytest.approx(-1.28)
    # negative advantage: min picks the unclipped (larger) penalty
    x = _inputs([[0.5]], [[0.0]], [[0.0]], [-1.0], [[1]])
    loss, _ = decoupled_ppo_loss(x, LossConfig())
    assert loss.item() == pytest.approx(math.exp(0.5))


def test_behaviour_weight_is_truncated():
    # proximal/behaviour = e^2 = 7.39 truncated at 2
    x = _inputs([[0.0]], [[0.0]], [[-2.0]], [1.0], [[1]])
    loss, stats = decoupled_ppo_loss(x, LossConfig(behaviour_weight_cap=2.0))
    assert loss.item() == pytest.approx(-2.0)
    assert float(stats["behaviour_weight_mean"]) == pytest.approx(2.0)
    # plain PPO ignores the proximal policy: ratio to behaviour e^2, clipped to 1.2
    loss, _ = ppo_clip_loss(x, LossConfig())
    assert loss.item() == pytest.approx(-1.2)


def test_padding_does_not_count():
    x = _inputs([[-1.0, 99.0]], [[-1.0, 0.0]], [[-1.0, 0.0]], [1.0], [[1, 0]])
    loss, _ = decoupled_ppo_loss(x, LossConfig())
    assert loss.item() == pytest.approx(-1.0)


def test_aggregation_token_vs_seq_mean():
    v = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(v, m, "token-mean").item() == pytest.approx(7 / 4)
    assert aggregate(v, m, "seq-mean").item() == pytest.approx((1 + 4) / 2)
    assert aggregate(v, m, "token-mean", denom=7.0).item() == pytest.approx(1.0)


def test_gradient_direction_raises_good_tokens():
    lp = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    x = LossInputs(lp, lp.detach(), lp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    loss, _ = decoupled_ppo_loss(x, LossConfig())
    loss.backward()
    assert lp.grad[0, 0] < 0 < lp.grad[1, 0]  # descent raises the good sample's logprob, lowers the bad one's


# ---------------------------------------------------------------- token rewards, returns, REINFORCE++, GAE

def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> bool:
    """Element-wise closeness of a tensor to nested lists of hand-computed values."""
    torch.testing.assert_close(actual.detach().float(), t(expected), atol=atol, rtol=1e-5)
    return True


def test_rloo_all_equal_group_and_singleton():
    adv = rloo_advantages(t([1.0, 1.0, 1.0, 0.7]), torch.tensor([0, 0, 0, 1]))
    assert close(adv, [0.0, 0.0, 0.0, 0.7])  # all equal: zero; a group of one has no baseline: its raw reward


def test_outcome_reward_lands_on_last_counted_token():
    r = outcome_token_rewards(t([1.0, 2.0, 3.0]), t([[1, 1, 0], [1, 0, 0], [0, 0, 0]]))
    assert r.tolist() == [[0, 1, 0], [2, 0, 0], [0, 0, 0]]  # an empty response gets nothing


def test_discounted_returns_hand_computed():
    assert discounted_returns(t([[0, 0, 1]]), t([[1, 1, 1]]), gamma=0.5).tolist() == [[0.25, 0.5, 1.0]]
    # a masked (tool) token inside the response passes the return through and holds nothing itself
    assert discounted_returns(t([[0, 7, 1]]), t([[1, 0, 1]]), gamma=0.5).tolist() == [[0.5, 0.0, 1.0]]


def test_reinforce_pp_global_normalisation_hand_computed():
    x = AdvantageInputs(rewards=t([1.0, 0.0]), group_ids=torch.tensor([0, 0]), mask=t([[1, 1], [1, 0]]))
    adv = ADVANTAGES["reinforce_pp"](x, AdvantageConfig(), None).advantages
    # returns [[1, 1], [0, pad]]: mean 2/3, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert close(adv, [[(1 / 3) / s, (1 / 3) / s], [-(2 / 3) / s, 0.0]], atol=1e-5)


def test_reinforce_pp_with_kl_in_reward_hand_computed():
    lp, ref = t([[-1.0, -1.0], [-1.0, -3.0]]), t([[-1.2, -1.4], [-1.1, -3.0]])
    mask = t([[1, 1], [1, 0]])
    shaping = kl_token_rewards(lp, ref, mask, coef=0.5, kind="k1")  # -0.5 * (lp - ref)
    assert close(shaping, [[-0.1, -0.2], [-0.05, 0.0]])
    x = AdvantageInputs(t([1.0, 0.0]), torch.tensor([0, 1]), mask, token_rewards=shaping)
    adv = ADVANTAGES["reinforce_pp"](x, AdvantageConfig(gamma=1.0), None).advantages
    g = [0.7, 0.8, -0.05]  # returns: [-0.1 + 0.8, 1 - 0.2], [-0.05]
    mean = sum(g) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in g) / 2)
    expect = [[(g[0] - mean) / std, (g[1] - mean) / std], [(g[2] - mean) / std, 0.0]]
    assert close(adv, expect, atol=1e-5)


def test_global_whitening_across_ranks_equals_whole_batch():
    x, m = t([[1.0, 2.0], [3.0, 10.0]]), t([[1, 1], [1, 0]])
    whole = masked_whiten(x, m)
    other = torch.tensor([3.0, 9.0, 1.0], dtype=torch.float64)  # rank 1 holds row 1: sum, sum of squares, count
    rank0 = masked_whiten(x[:1], m[:1], reduce=lambda s: s + other)
    assert close(rank0, whole[:1].tolist())
    assert close(whole, [[-1.0, 0.0], [1.0, 0.0]], atol=1e-5)  # values 1, 2, 3: mean 2, std 1
    assert masked_whiten(t([[2.0, 2.0]]), t([[1, 1]])).tolist() == [[0.0, 0.0]]  # all equal: zero, no NaN


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_all_equal_rewards_give_zero_advantage(name):
    mask = t([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    x = AdvantageInputs(t([0.5, 0.5, 0.5]), torch.tensor([4, 4, 4]), mask)
    adv = ADVANTAGES[name](x, AdvantageConfig(), None).advantages
    assert adv.abs().max().item() < 1e-5 and not torch.isnan(adv).any()


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_estimator_is_zero_on_padding(name):
    mask = t([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    values = t([[0.1, 0.2, 99.0, 99.0], [0.3, 0.1, 0.2, -99.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.1, 0.2, 0.3]])
    x = AdvantageInputs(t([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]), mask,
                        values=values if needs_values(name) else None)
    out = ADVANTAGES[name](x, AdvantageConfig(gamma=0.9, lam=0.8), None)
    assert (out.advantages * (1 - mask)).abs().max().item() == 0.0
    assert not torch.isnan(out.advantages).any()
    assert out.advantages[3].abs().sum() > 0  # a real sample gets signal


def test_grpo_with_kl_in_reward_uses_the_sample_total():
    mask = t([[1, 1], [1, 1]])
    shaping = t([[-0.25, -0.25], [0.0, 0.0]])
    x = AdvantageInputs(t([1.0, 0.0]), torch.tensor([0, 0]), mask, token_rewards=shaping)
    adv = ADVANTAGES["grpo"](x, AdvantageConfig(std_normalize=False), None).advantages
    assert adv.tolist() == [[0.25, 0.25], [-0.25, -0.25]]  # outcomes 0.5 and 0: mean 0.25


def test_gae_hand_computed():
    mask = t([[1, 1, 1]])
    rewards = t([[0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, t([[0.5, 0.6, 0.7]]), mask, gamma=0.9, lam=0.8)
    # t=2: d=1-0.7=0.3; t=1: d=0.9*0.7-0.6=0.03, A=0.03+0.72*0.3=0.246; t=0: d=0.9*0.6-0.5=0.04, A=0.04+0.72*0.246
    assert close(adv, [[0.21712, 0.246, 0.3]], atol=1e-6)
    assert close(ret, [[0.71712, 0.846, 1.0]], atol=1e-6)
    # gamma = lambda = 1: A_t = R - V_t (Monte Carlo)
    adv, _ = gae(rewards, t([[0.5, 0.6, 0.7]]), mask, gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.4, 0.3]])


def test_gae_padding_and_masked_tool_tokens():
    # right padding holds garbage values: the episode ends at the last counted token
    adv, ret = gae(t([[0.0, 0.0, 0.0]]), t([[0.2, 0.4, 99.0]]), t([[1, 1, 0]]), gamma=0.9, lam=0.8)
    assert close(adv, [[0.16 + 0.72 * -0.4, -0.4, 0.0]])
    assert close(ret, [[0.072, 0.0, 0.0]], atol=1e-6)
    # a tool token in the middle is skipped: bootstrap from the next counted token
    adv, _ = gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 9.0, 0.7]]), t([[1, 0, 1]]), gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.0, 0.3]])


def test_gae_estimator_whitens_and_needs_values():
    assert needs_values("gae") and not needs_values("grpo")
    x = AdvantageInputs(t([1.0, 0.0]), torch.tensor([0, 1]), t([[1, 1], [1, 1]]), values=t([[0.5, 0.5], [0.5, 0.5]]))
    out = ADVANTAGES["gae"](x, AdvantageConfig(gamma=1.0, lam=1.0, whiten=False), None)
    assert out.advantages.tolist() == [[0.5, 0.5], [-0.5, -0.5]]
    assert out.returns.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    white = ADVANTAGES["gae"](x, AdvantageConfig(gamma=1.0, lam=1.0, whiten=True), None).advantages
    s = math.sqrt(4 * 0.25 / 3)
    assert close(white, [[0.5 / s, 0.5 / s], [-0.5 / s, -0.5 / s]], atol=1e-5)
    with pytest.raises(ValueError, match="critic values"):
        ADVANTAGES["gae"](AdvantageInputs(t([1.0]), torch.tensor([0]), t([[1]])), AdvantageConfig(), None)


def test_value_loss_clipping_hand_computed():
    # token 0: unclipped error 0.25 beats clipped (0.2 - 0.5)^2 = 0.09; token 1: no move, error 1
    loss, stats = value_loss(t([[1.0, 2.0]]), t([[0.0, 2.0]]), t([[0.5, 3.0]]), t([[1, 1]]), clip=0.2)
    assert loss.item() == pytest.approx((0.5 * 0.25 + 0.5 * 1.0) / 2)
    # the clipped value (0.2) is further from the return than the new one (0.3): the clipped error counts
    loss, stats = value_loss(t([[0.3]]), t([[0.0]]), t([[1.0]]), t([[1]]), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64) and float(stats["value_clip_frac"]) == 1.0
    loss, _ = value_loss(t([[0.3]]), t([[0.0]]), t([[1.0]]), t([[1]]), clip=0.0)
    assert loss.item() == pytest.approx(0.5 * 0.49)
    loss, _ = value_loss(t([[0.3, 50.0]]), t([[0.0, 0.0]]), t([[1.0, 0.0]]), t([[1, 0]]), clip=0.0)
    assert loss.item() == pytest.approx(0.5 * 0.49)  # padding does not count


def test_entropy_bonus_and_kl_loss_against_reference():
    lp = t([[-1.0, -1.0]])
    ent = t([[1.0, 3.0]]).requires_grad_(True)
    x = LossInputs(lp, lp, lp, t([0.0]), t([[1, 1]]), entropy=ent)
    loss, _ = decoupled_ppo_loss(x, LossConfig(entropy_coef=0.1))
    assert loss.item() == pytest.approx(-0.1 * 2.0)  # zero advantage: only the bonus, -coef * mean entropy
    loss.backward()
    assert close(ent.grad, [[-0.05, -0.05]])  # descent raises entropy
    x = LossInputs(t([[-1.0]]), t([[-1.0]]), t([[-1.0]]), t([0.0]), t([[1]]), ref_logprobs=t([[-2.0]]))
    loss, stats = decoupled_ppo_loss(x, LossConfig(kl_coef=0.5, kl_estimator="k1"))
    assert loss.item() == pytest.approx(0.5) and float(stats["kl_ref"]) == pytest.approx(1.0)
    assert float(stats["kl_behaviour"]) == 0.0
    loss, _ = decoupled_ppo_loss(x, LossConfig(kl_coef=0.5, kl_estimator="k3"))
    assert loss.item() == pytest.approx(0.5 * math.exp(-1))


def test_seq_mean_counts_each_sample_once_whatever_its_length():
    lp = t([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x = LossInputs(lp, lp, lp, t([1.0, -1.0]), t([[1, 1, 1, 1], [1, 0, 0, 0]]))
    tok, _ = decoupled_ppo_loss(x, LossConfig(loss_agg="token-mean"))
    seq, _ = decoupled_ppo_loss(x, LossConfig(loss_agg="seq-mean"))
    assert tok.item() == pytest.approx(-(4 - 1) / 5)
    assert seq.item() == pytest.approx(0.0)  # (-1 + 1) / 2


# ---------------------------------------------------------------- group_size 1, RLOO std

@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_group_of_one_gets_its_raw_reward(name, std_normalize):
    """rollout.group_size = 1: no baseline to subtract, so the advantage is the reward (verl), not 0."""
    x = AdvantageInputs(t([0.7, 0.0, 1.0]), torch.tensor([0, 1, 2]), t([[1, 1], [1, 0], [1, 1]]))
    adv = ADVANTAGES[name](x, AdvantageConfig(std_normalize=std_normalize), None).advantages
    if name == "reinforce_pp_baseline":  # returns [[.7, .7], [0], [1, 1]] whitened over the batch
        g = [0.7, 0.7, 0.0, 1.0, 1.0]
        mean, std = sum(g) / 5, math.sqrt(sum((v - sum(g) / 5) ** 2 for v in g) / 4)
        expect = [[(0.7 - mean) / std] * 2, [-mean / std, 0.0], [(1 - mean) / std] * 2]
        assert close(adv, expect, atol=1e-5)
    else:
        assert close(adv, [[0.7, 0.7], [0.0, 0.0], [1.0, 1.0]])


def test_rloo_honours_std_normalize():
    x = AdvantageInputs(t([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]), t([[1], [1], [1]]))
    plain = ADVANTAGES["rloo"](x, AdvantageConfig(std_normalize=False), None).advantages
    assert close(plain, [[1.0], [-0.5], [-0.5]])
    # rewards 1, 0, 0: mean 1/3, unbiased variance ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3
    std = math.sqrt(1 / 3)
    scaled = ADVANTAGES["rloo"](x, AdvantageConfig(std_normalize=True), None).advantages
    assert close(scaled, [[1.0 / std], [-0.5 / std], [-0.5 / std]], atol=1e-5)
    assert close(rloo_advantages(t([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]), std_normalize=True),
                 [1.0 / std, -0.5 / std, -0.5 / std], atol=1e-5)


# ---------------------------------------------------------------- dual clip

def test_dual_clip_caps_negative_advantage_tokens():
    # ratio e^1.5 = 4.48 with A = -1: PPO's loss is 4.48 (the min keeps the unclipped penalty); dual clip caps it at 3
    x = _inputs([[1.5, 1.5, 0.1]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [[-1.0, 1.0, -1.0]], [[1, 1, 1]])
    loss, stats = decoupled_ppo_loss(x, LossConfig(clip_ratio_c=3.0))
    # token 1: A = +1, ratio clipped to 1.2: -1.2; token 2: ratio e^0.1 = 1.105 < 3: loss 1.105
    assert loss.item() == pytest.approx((3.0 - 1.2 + math.exp(0.1)) / 3)
    assert float(stats["dual_clip_frac"]) == pytest.approx(1 / 3)
    off, stats = decoupled_ppo_loss(x, LossConfig(clip_ratio_c=0.0))
    assert off.item() == pytest.approx((math.exp(1.5) - 1.2 + math.exp(0.1)) / 3)
    assert float(stats["dual_clip_frac"]) == 0.0
    assert ppo_clip_loss(x, LossConfig(clip_ratio_c=3.0))[0].item() == pytest.approx(loss.item())


def test_dual_clipped_token_has_no_gradient_and_keeps_its_behaviour_weight():
    lp = torch.tensor([[1.5]], requires_grad=True)
    x = LossInputs(lp, t([[0.0]]), t([[-0.5]]), t([-2.0]), t([[1]]))
    loss, _ = decoupled_ppo_loss(x, LossConfig(clip_ratio_c=3.0, behaviour_weight_cap=2.0))
    assert loss.item() == pytest.approx(2.0 * 3.0 * math.exp(0.5))  # -A * c, times the weight e^0.5 = 1.65
    loss.backward()
    assert lp.grad.item() == 0.0


# ---------------------------------------------------------------- behaviour weight cap: clamp or mask

def test_behaviour_cap_mask_drops_the_token_but_keeps_it_in_the_denominator():
    # weights e^2 = 7.39 (over the cap 2) and e^0.5 = 1.65; advantages 1, ratio 1 (current == proximal)
    x = _inputs([[0.0, 0.0]], [[0.0, 0.0]], [[-2.0, -0.5]], [1.0], [[1, 1]])
    clamp, stats = decoupled_ppo_loss(x, LossConfig(behaviour_weight_cap=2.0, behaviour_cap_mode="clamp"))
    assert clamp.item() == pytest.approx(-(2.0 + math.exp(0.5)) / 2)
    assert float(stats["behaviour_masked_frac"]) == 0.0
    mask, stats = decoupled_ppo_loss(x, LossConfig(behaviour_weight_cap=2.0, behaviour_cap_mode="mask"))
    assert mask.item() == pytest.approx(-(0.0 + math.exp(0.5)) / 2)  # the dropped token still counts in the 2
    assert float(stats["behaviour_masked_frac"]) == pytest.approx(0.5)
    assert float(stats["behaviour_weight_mean"]) == pytest.approx(math.exp(0.5) / 2)
    with pytest.raises(ValueError, match="clamp, mask"):
        decoupled_ppo_loss(x, LossConfig(behaviour_cap_mode="drop"))


def test_masked_token_keeps_its_kl_term():
    lp = torch.tensor([[0.0]], requires_grad=True)
    x = LossInputs(lp, t([[0.0]]), t([[-3.0]]), t([1.0]), t([[1]]), ref_logprobs=t([[-1.0]]))
    loss, _ = decoupled_ppo_loss(x, LossConfig(behaviour_cap_mode="mask", kl_coef=0.5, kl_estimator="k1"))
    assert loss.item() == pytest.approx(0.5 * 1.0)  # policy-gradient term gone, KL(k1) = 0 - (-1) stays
    loss.backward()
    assert lp.grad.item() == pytest.approx(0.5)


# ---------------------------------------------------------------- GSPO

def test_gspo_sequence_ratio_and_clipping_hand_computed():
    # sequence 0: log-ratios 0.2, 0.4 -> s = e^0.3 = 1.35 > 1.2, A = +1: clipped, -1.2 on both tokens
    # sequence 1: log-ratios -0.1 (and padding) -> s = e^-0.1 = 0.905 inside [0.8, 1.2], A = -1: 0.905
    lp = torch.tensor([[0.2, 0.4], [-0.1, 5.0]], requires_grad=True)
    x = LossInputs(lp, t([[0.0, 0.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, 0.0]]), t([1.0, -1.0]), t([[1, 1], [1, 0]]))
    cfg = LossConfig(clip_low=0.2, clip_high=0.2, loss_agg="seq-mean")
    loss, stats = gspo_loss(x, cfg)
    assert loss.item() == pytest.approx((-1.2 + math.exp(-0.1)) / 2)
    assert float(stats["clip_frac"]) == pytest.approx(2 / 3)  # both tokens of sequence 0
    assert float(stats["ratio_mean"]) == pytest.approx((2 * math.exp(0.3) + math.exp(-0.1)) / 3)
    loss.backward()
    # clipped sequence: no gradient; sequence 1: d/dlogp of -A * s / 1 token / 2 sequences = s / 2
    assert close(lp.grad, [[0.0, 0.0], [math.exp(-0.1) / 2, 0.0]])


def test_gspo_gradient_is_the_sequence_ratio_gradient():
    """Unclipped, with seq-mean the token form's gradient equals that of -A * s(theta) itself:
    d s / d logp_t = s / |y| for every token of the sequence."""
    lp = torch.tensor([[-0.05, 0.02, 0.01]], requires_grad=True)
    x = LossInputs(lp, t([[0.0, 0.0, 0.0]]), t([[0.0, 0.0, 0.0]]), t([2.0]), t([[1, 1, 1]]))
    loss, _ = gspo_loss(x, LossConfig(clip_low=0.2, clip_high=0.2, loss_agg="seq-mean"))
    loss.backward()
    s = math.exp((-0.05 + 0.02 + 0.01) / 3)
    assert loss.item() == pytest.approx(-2.0 * s)
    assert close(lp.grad, [[-2.0 * s / 3] * 3])
    assert "gspo" in POLICY_LOSSES


def test_gspo_has_no_dual_clip():
    x = _inputs([[2.0]], [[0.0]], [[0.0]], [-1.0], [[1]])
    loss, stats = gspo_loss(x, LossConfig(clip_ratio_c=3.0, loss_agg="seq-mean"))
    assert loss.item() == pytest.approx(math.exp(2.0)) and float(stats["dual_clip_frac"]) == 0.0


# ---------------------------------------------------------------- aggregations and the global denominator

def test_aggregations_hand_computed():
    v = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = t([[1, 1, 1], [1, 0, 0]])
    assert aggregate(v, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-sum-norm").item() == pytest.approx((6 / 3 + 4 / 3) / 2)  # padded width 3
    denom = aggregate_denominator("seq-mean-token-sum-norm", tokens=4, samples=2, horizon=8)
    assert denom == 16 and aggregate(v, m, "seq-mean-token-sum-norm", denom).item() == pytest.approx((6 / 8 + 4 / 8) / 2)
    assert aggregate_denominator("token-mean", 4, 2, 8) == 4 and aggregate_denominator("seq-mean-token-sum", 4, 2, 8) == 2
    for denom in (None, 4.0):
        with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
            aggregate(v, m, "sum", denom)


def _random_batch(seed: int, lengths: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, w = len(lengths), max(lengths)
    mask = (torch.arange(w)[None, :] < torch.tensor(lengths)[:, None]).float()
    mask[0, 1] = 0.0  # a masked (tool) token inside a response
    return {"lp": -torch.rand(b, w, generator=g) * 2, "prox": -torch.rand(b, w, generator=g) * 2,
            "beh": -torch.rand(b, w, generator=g) * 2, "adv": torch.randn(b, generator=g), "mask": mask,
            "lengths": torch.tensor(lengths)}


def _loss_of(batch: dict, rows: list[int], name: str, cfg: LossConfig, denom: float | None):
    """The loss of `rows` of the batch, trimmed to their own longest response (as a micro-batch is); no
    rows is the dummy micro-batch a rank with fewer samples runs: one row, nothing counted."""
    if not rows:
        lp = torch.zeros(1, 1, requires_grad=True)
        x = LossInputs(lp, torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1))
        loss, _ = POLICY_LOSSES[name](x, cfg, denom)
        return loss.item(), torch.zeros_like(batch["lp"])
    width = int(batch["lengths"][rows].max())
    lp = batch["lp"][rows, :width].clone().requires_grad_(True)
    x = LossInputs(lp, batch["prox"][rows, :width], batch["beh"][rows, :width], batch["adv"][rows],
                   batch["mask"][rows, :width])
    loss, _ = POLICY_LOSSES[name](x, cfg, denom)
    loss.backward()
    grad = torch.zeros_like(batch["lp"])
    grad[rows, :width] = lp.grad
    return loss.item(), grad


@pytest.mark.parametrize("how", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("name", ["decoupled_ppo", "gspo"])
def test_micro_batch_losses_add_up_to_the_whole_batch(how, name):
    """With the mini-batch's global denominator, however the samples are split into micro-batches (of
    different padded widths, plus a dummy one), the losses and gradients add up to the one-batch aggregate."""
    batch = _random_batch(0, [5, 2, 7, 1, 4])
    cfg = LossConfig(clip_low=0.2, clip_high=0.28, loss_agg=how, behaviour_cap_mode="mask", behaviour_weight_cap=1.5)
    denom = aggregate_denominator(how, float(batch["mask"].sum()), 5, horizon=10)
    whole, whole_grad = _loss_of(batch, [0, 1, 2, 3, 4], name, cfg, denom)
    if how != "seq-mean-token-sum-norm":  # the global denominator is the one-batch one
        assert whole == pytest.approx(_loss_of(batch, [0, 1, 2, 3, 4], name, cfg, None)[0], rel=1e-6)
    parts = [_loss_of(batch, rows, name, cfg, denom) for rows in ([0, 3], [1], [2, 4], [])]
    assert sum(p[0] for p in parts) == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert close(sum(p[1] for p in parts), whole_grad.tolist(), atol=1e-6)
    assert whole_grad.abs().sum() > 0


def test_seq_mean_token_sum_norm_is_the_token_sum_over_samples_times_horizon():
    batch = _random_batch(1, [3, 2, 3])
    cfg = LossConfig(loss_agg="seq-mean-token-sum-norm", clip_ratio_c=0.0)
    loss, _ = _loss_of(batch, [0, 1, 2], "decoupled_ppo", cfg, aggregate_denominator(cfg.loss_agg, 7.0, 3, 16))
    total, _ = _loss_of(batch, [0, 1, 2], "decoupled_ppo", LossConfig(loss_agg="seq-mean-token-sum", clip_ratio_c=0.0), None)
    assert loss == pytest.approx(total / 16, rel=1e-6)  # seq-mean-token-sum is (sum)/3; norm is (sum)/(3 * 16)
