import math

import pytest
import torch

from rl.algorithms import (LossConfig, LossInputs, aggregate, decoupled_ppo_loss, grpo_advantages, kl_estimate,
                           ppo_clip_loss, rloo_advantages)


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
    assert stats["behaviour_weight_mean"] == pytest.approx(2.0)
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
