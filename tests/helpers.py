"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

import ray


def logprob_gap(ctl, prompt: str = "13+5=", answer: str = "18") -> float:
    """Max |trainer - engine| logprob over the tokens of a fixed prompt + answer + EOS, engine 0."""
    ids = ctl.tokenizer(prompt)["input_ids"] + ctl.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids += [ctl.tokenizer.eos_token_id]
    trainer_lp = ctl.trainer.sequence_logprobs(ids)
    engine_lp = ray.get(ctl.rollouts[0].prompt_logprobs.remote(ids), timeout=120)
    return max(abs(a - b) for a, b in zip(trainer_lp[1:], engine_lp[1:]))
