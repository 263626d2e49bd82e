"""Micro-batch planning and tensors (pure, no process group), and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rl.core.config import TrainerConfig
from trainer.batching import (Sample, collate, pad_stack, padded_tokens, plan_micro_batches, samples_from_columns,
                              split_mini_batches)
from trainer.engine import lr_lambda


def sample(prompt: list[int], response: list[int], mask: list[int] | None = None) -> Sample:
    m = torch.ones(len(response)) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return Sample(prompt, response, torch.full((len(response),), -1.0), m, 1.0, 0, 0)


def test_padded_plan_bins_by_length_within_the_budget():
    lengths = [10, 3, 9, 4, 2, 10, 30]
    plan = plan_micro_batches(lengths, token_budget=20)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))  # every sample exactly once
    assert plan[0] == [6]  # longer than the budget: alone
    for b in plan[1:]:
        assert len(b) * max(lengths[i] for i in b) <= 20
    assert plan[1] == [0, 5]  # the two 10s share a micro-batch; short ones go together
    assert padded_tokens(lengths, plan, packed=False) < len(lengths) * max(lengths)


def test_packed_plan_first_fit_and_caps():
    lengths = [7, 6, 5, 4, 3, 2]
    plan = plan_micro_batches(lengths, token_budget=10, packed=True)
    assert all(sum(lengths[i] for i in b) <= 10 for b in plan)
    assert plan == [[0, 4], [1, 3], [2, 5]]  # first-fit decreasing
    assert padded_tokens(lengths, plan, packed=True) == sum(lengths)
    assert plan_micro_batches(lengths, max_samples=4) == [[0, 1, 2, 3], [4, 5]]
    assert plan_micro_batches(lengths) == [[0, 1, 2, 3, 4, 5]]  # no budget, no cap: one micro-batch
    assert plan_micro_batches([]) == []


def test_mini_batches_split_evenly():
    assert split_mini_batches(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_mini_batches(4, 1) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("packed", [False, True])
def test_collate_points_each_response_token_at_its_predicting_position(packed):
    s = [sample([1, 5, 6], [7, 8]), sample([1, 9], [10, 11, 12], mask=[1, 0, 1])]
    mb = collate(s, [0, 1], packed=packed)
    flat = mb.input_ids.reshape(-1)
    assert torch.equal(mb.targets, torch.tensor([[7, 8, 0], [10, 11, 12]]))
    assert torch.equal(mb.mask, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    for i in range(2):
        for j in range(len(s[i].response_ids)):
            assert flat[mb.positions[i, j] + 1] == mb.targets[i, j]  # position p predicts token p + 1
    if packed:
        assert mb.attention_mask is None and mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    else:
        assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert torch.equal(mb.field([x.behaviour for x in s]), torch.tensor([[-1.0, -1.0, 0.0], [-1.0, -1.0, -1.0]]))


def test_empty_micro_batch_is_a_dummy_that_counts_nothing():
    mb = collate([sample([1], [2])], [], packed=False)
    assert mb.index == [] and mb.mask.sum() == 0 and mb.input_ids.shape == (1, 2)
    assert mb.field([torch.ones(1)]).sum() == 0


def test_samples_from_columns_pads_short_logprobs_and_reads_loss_mask():
    cols = {"prompt_ids": [[1, 2]], "response_ids": [[3, 4, 5]], "logprobs": [[-0.5, -0.25]], "reward": [1.0],
            "group": [3], "version": [2], "loss_mask": [[1, 0, 1]]}
    (s,) = samples_from_columns(cols)
    assert s.behaviour.tolist() == [-0.5, -0.25, 0.0]
    assert s.loss_mask.tolist() == [1.0, 0.0, 0.0]  # a token without a behaviour logprob does not count
    assert (s.group, s.version, s.length) == (3, 2, 5)
    with pytest.raises(ValueError, match="empty prompt"):
        samples_from_columns({**cols, "prompt_ids": [[]]})


def test_pad_stack_shapes():
    assert pad_stack([torch.tensor([1.0]), torch.tensor([2.0, 3.0])]).tolist() == [[1.0, 0.0], [2.0, 3.0]]
    assert pad_stack([], 3).shape == (1, 3)


def test_packed_logprobs_equal_padded(tiny_model):
    """transformers builds a block-causal mask from restarting position ids: packed == padded."""
    from transformers import AutoModelForCausalLM

    from trainer.model import response_logits, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    s = [sample([1, 20, 14, 22, 16], [30, 2]), sample([1, 21, 14], [23, 24, 25, 2]), sample([1, 19], [2])]
    with torch.no_grad():
        padded = token_logprobs(response_logits(model, collate(s, [0, 1, 2], packed=False)), collate(s, [0, 1, 2]).targets)
        mb = collate(s, [0, 1, 2], packed=True)
        packed = token_logprobs(response_logits(model, mb), mb.targets)
    assert torch.allclose(padded * mb.mask, packed * mb.mask, atol=1e-5)


def test_response_logits_are_the_full_logits_at_response_positions(tiny_model):
    """The LM head runs on the response-predicting positions only (a pre-hook picks their hidden states):
    the logits equal the full forward's at those positions, padded and packed, and the gradient matches."""
    from transformers import AutoModelForCausalLM

    from trainer.model import logprobs_and_entropy, model_inputs, response_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    s = [sample([1, 20, 14, 22, 16], [30, 2]), sample([1, 21, 14], [23, 24, 25, 2]), sample([1, 19], [2])]
    for packed in (False, True):
        mb = collate(s, [0, 1, 2], packed=packed)
        picked = response_logits(model, mb, temperature=0.7)
        full = model(**model_inputs(mb), use_cache=False).logits
        want = full.reshape(-1, full.shape[-1])[mb.positions.reshape(-1)].reshape(*mb.positions.shape, -1) / 0.7
        assert picked.shape == want.shape == (3, 4, model.config.vocab_size)
        assert torch.allclose(picked, want, atol=1e-5)
        lp, _ = logprobs_and_entropy(picked, mb.targets)
        (lp * mb.mask).sum().backward()
        g1 = model.lm_head.weight.grad.clone()
        model.zero_grad()
        lw = torch.log_softmax(want, -1).gather(-1, mb.targets[..., None]).squeeze(-1)
        (lw * mb.mask).sum().backward()
        assert torch.allclose(g1, model.lm_head.weight.grad, atol=1e-5)
        model.zero_grad()
    assert not model.lm_head._forward_pre_hooks  # the hook is removed after each call


def test_logprobs_and_entropy_match_their_definitions():
    from trainer.model import logprobs_and_entropy

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    logp = torch.log_softmax(logits, -1)
    want_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    want_ent = -(logp.exp() * logp).sum(-1)
    for block in (1 << 28, 11 * 4 * 2):  # one block; blocks of 2 rows (the last one short)
        lp, ent = logprobs_and_entropy(logits, targets, block_bytes=block)
        assert torch.allclose(lp, want_lp, atol=1e-6) and torch.allclose(ent, want_ent, atol=1e-6)
        assert lp.requires_grad and not ent.requires_grad
    lp, ent = logprobs_and_entropy(logits, targets, entropy_grad=True)
    assert ent.requires_grad and torch.allclose(ent, want_ent, atol=1e-6)


def test_pad_multiple_rounds_lengths_and_leaves_logprobs_alone(tiny_model):
    """trainer.pad_multiple: the planner budgets rounded lengths, collate pads rows (or the packed row) to
    the multiple, and the logprobs of every response token are what they are without it."""
    from transformers import AutoModelForCausalLM

    from trainer.batching import padded_tokens, plan_micro_batches
    from trainer.model import pad_multiple, response_logits, token_logprobs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [pad_multiple(0, cuda), pad_multiple(0, cpu), pad_multiple(8, cpu)] == [64, 1, 8]  # 0: auto
    assert plan_micro_batches([10, 9, 5], token_budget=32, multiple=16) == [[0, 1], [2]]  # 2 x 16 fits, 3 x 16 not
    assert plan_micro_batches([10, 9, 5], token_budget=32) == [[0, 1, 2]]
    assert padded_tokens([10, 9, 5], [[0, 1], [2]], packed=False, multiple=16) == 48
    assert plan_micro_batches([10, 9, 5], token_budget=16, packed=True, multiple=8) == [[0, 2], [1]]
    assert padded_tokens([10, 9, 5], [[0, 2], [1]], packed=True, multiple=8) == 16 + 16
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    s = [sample([1, 20, 14, 22, 16], [30, 2]), sample([1, 21, 14], [23, 24, 25, 2]), sample([1, 19], [2])]
    with torch.no_grad():
        for packed in (False, True):
            base, padded = collate(s, [0, 1, 2], packed=packed), collate(s, [0, 1, 2], packed=packed, multiple=16)
            assert padded.input_ids.shape[1] == (32 if packed else 16) > base.input_ids.shape[1]  # 17 packed, 7 rows
            want = token_logprobs(response_logits(model, base), base.targets) * base.mask
            got = token_logprobs(response_logits(model, padded), padded.targets) * padded.mask
            assert torch.allclose(want, got, atol=1e-5)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(TrainerConfig(lr_schedule="cosine", warmup_steps=2, total_steps=12, min_lr_ratio=0.1))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    g = lr_lambda(TrainerConfig(lr_schedule="constant", warmup_steps=0))
    assert g(0) == g(100) == 1.0
