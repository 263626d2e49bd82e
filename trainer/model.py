"""The trainer's models: loading, FSDP2 sharding with mixed precision, and token logprobs.

Master weights are always float32 (so are AdamW's moments, which follow the parameters); FSDP2's
`MixedPrecisionPolicy` casts the all-gathered parameters to `trainer.compute_dtype` for forward and
backward and reduce-scatters gradients in `trainer.reduce_dtype`. `model.dtype` stays what it always
meant: the dtype of generation (and of the exported model).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from rl.core.config import LoraConfig, TrainerConfig
from trainer.batching import MicroBatch

ModelSource = Union[str, Any]  # an HF directory / hub id, or a transformers config (random init, for benchmarks)


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`trainer.compute_dtype`: auto is bfloat16 on CUDA and float32 on CPU (where bf16 matmuls are slow
    and the trainer must agree with a float32 engine to 1e-4)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


def pad_multiple(setting: int, device: torch.device) -> int:
    """`trainer.pad_multiple`: 0 (auto) is 64 on CUDA, where cuDNN attention builds a plan per input shape,
    and 1 on CPU, where a new shape costs nothing and padding costs compute."""
    return setting or (64 if device.type == "cuda" else 1)


def mp_policy(cfg: TrainerConfig, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute_dtype(cfg.compute_dtype, device),
                                reduce_dtype=getattr(torch, cfg.reduce_dtype))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (each becomes one FSDP2 unit)."""
    for path in ("model.layers", "layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def shard(model: torch.nn.Module, layers: list[torch.nn.Module], cfg: TrainerConfig, device: torch.device) -> None:
    """FSDP2: one unit per decoder layer plus the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    policy = mp_policy(cfg, device)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def load_causal_lm(source: ModelSource, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A float32 causal LM from a directory / hub id, or randomly initialised (same on every rank) from a config."""
    from transformers import AutoModelForCausalLM

    if isinstance(source, str):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(source, dtype=torch.float32)
    return model.to(device)


def build_policy(source: ModelSource, cfg: TrainerConfig, device: torch.device, seed: int = 0,
                 lora: Optional[LoraConfig] = None) -> torch.nn.Module:
    """The trained policy: float32 master weights, LoRA adapters if asked (the frozen base is sharded
    too), activation checkpointing if asked, sharded."""
    model = load_causal_lm(source, device, seed)
    model.config.use_cache = False
    if lora is not None and lora.rank > 0:
        from trainer.lora import apply_lora

        model = apply_lora(model, lora)
    if cfg.activation_checkpointing:
        # HF's own switch keeps parameter names unchanged (weight sync, checkpoints and export rely on them)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard(model, decoder_layers(model), cfg, device)
    return model


def build_reference(source: ModelSource, cfg: TrainerConfig, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A frozen, sharded copy of the starting policy (the KL reference for algorithm.kl_reference = initial)."""
    model = load_causal_lm(source, device, seed)
    model.requires_grad_(False)
    model.eval()
    shard(model, decoder_layers(model), cfg, device)
    return model


def model_inputs(mb: MicroBatch) -> dict[str, Optional[torch.Tensor]]:
    kw: dict[str, Optional[torch.Tensor]] = {"input_ids": mb.input_ids}
    if mb.attention_mask is not None:
        kw["attention_mask"] = mb.attention_mask
    if mb.position_ids is not None:
        kw["position_ids"] = mb.position_ids  # packed: transformers builds a block-causal mask from these
    return kw


def response_logits(model: torch.nn.Module, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
    """(n, R, V) float32 logits at the positions that predict each response token, scaled like the sampler.

    The LM head runs on those positions only: a forward pre-hook on the output embedding picks their hidden
    states (n * R rows of width H) before the head sees them. Prompt and padding positions cost no head
    matmul and no vocabulary-wide memory, and no vocabulary-wide tensor is indexed (or index_add-ed in
    backward)."""
    head = model.get_output_embeddings()
    index = mb.positions.reshape(-1)

    def pick(_module: torch.nn.Module, args: tuple) -> tuple:
        h = args[0]
        return (h.reshape(-1, h.shape[-1]).index_select(0, index).reshape(*mb.positions.shape, h.shape[-1]),
                *args[1:])

    hook = head.register_forward_pre_hook(pick) if head is not None else None
    try:
        logits = model(**model_inputs(mb), use_cache=False).logits
    finally:
        if hook is not None:
            hook.remove()
    if tuple(logits.shape[:2]) != tuple(mb.positions.shape):  # a model without a separate head module
        flat = logits.reshape(-1, logits.shape[-1])
        logits = flat.index_select(0, index).reshape(*mb.positions.shape, -1)
    logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, R) logprob of each target under (n, R, V) logits (fused log-softmax + gather)."""
    n, r, v = logits.shape
    return -F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), reduction="none").reshape(n, r)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, entropy_grad: bool = False,
                         block_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, R) logprob of each target and (n, R) entropy, from one log-softmax of (n, R, V) logits. The
    entropy carries a gradient only when asked (an entropy bonus); as a metric it is computed without one,
    a block of rows at a time, so it adds no vocabulary-wide tensor to the autograd graph."""
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if entropy_grad:
        return lp, -(logp.exp() * logp).sum(-1)
    with torch.no_grad():
        flat = logp.detach().reshape(-1, logp.shape[-1])
        rows = max(1, block_bytes // max(flat.shape[1] * flat.element_size(), 1))
        ent = torch.cat([-(b.exp() * b).sum(-1) for b in flat.split(rows)]) if flat.shape[0] else flat.sum(-1)
    return lp, ent.reshape(lp.shape)


def param_count(model: torch.nn.Module) -> int:
    """Parameters of the full (unsharded) model."""
    return sum(p.numel() for p in model.parameters())
