"""The critic for GAE: a separate value model, not a head on the policy.

Why separate: the policy stays exactly the Hugging Face causal LM, so the weight sync to vLLM, the
distributed checkpoints' names and the HF export need no special case; and the value regression cannot
pull on the policy's features (with a shared trunk the two losses need a weighting that is hard to
choose). The cost is a second trunk's memory and compute, paid only when `algorithm.advantage = gae`.

It is the policy's transformer trunk (initialised from the same weights) with a zero-initialised scalar
head, sharded with FSDP2 on the same trainer ranks and micro-batches as the policy, with its own AdamW.
"""

from __future__ import annotations

import torch

from rl.core.config import TrainerConfig
from trainer.batching import MicroBatch
from trainer.model import ModelSource, decoder_layers, load_causal_lm, model_inputs, shard


class Critic(torch.nn.Module):
    def __init__(self, trunk: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        """(rows, L, 1) value of the state at every position (the prefix up to and including that token).
        Not squeezed here: an FSDP2 module should return a fresh tensor, not a view."""
        hidden = self.trunk(**inputs, use_cache=False).last_hidden_state
        return self.head(hidden)


def build_critic(source: ModelSource, cfg: TrainerConfig, device: torch.device, seed: int = 0) -> Critic:
    """The critic: the source model's trunk (its LM head dropped) plus a fresh value head, sharded."""
    trunk = load_causal_lm(source, device, seed).base_model
    if cfg.activation_checkpointing:
        trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic = Critic(trunk, trunk.config.hidden_size).to(device)
    shard(critic, decoder_layers(trunk), cfg, device)
    return critic


def response_values(critic: Critic, mb: MicroBatch) -> torch.Tensor:
    """(n, R) float32 value at each position that predicts a response token, i.e. V(s_t) before token t."""
    values = critic(**model_inputs(mb))
    return values.reshape(-1).index_select(0, mb.positions.reshape(-1)).float().reshape(mb.positions.shape)
