import math

import pytest
import torch

from rl.algorithms import (ADVANTAGES, AdvantageConfig, AdvantageInputs, LossConfig, LossInputs, aggregate,
                           decoupled_ppo_loss, discounted_returns, gae, grpo_advantages, kl_estimate,
                           kl_token_rewards, masked_whiten, needs_values, outcome_token_rewards, ppo_clip_loss,
                           rloo_advantages, value_loss)


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
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: zero; a group of one has no baseline: zero


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
