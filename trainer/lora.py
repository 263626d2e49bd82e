"""LoRA on the trainer (`model.lora.rank` > 0): PEFT adapters injected in place, the merged weights a sync
sends, and the export in PEFT's format.

`inject_adapter_in_model` wraps each target linear in place (no `PeftModel` around the model), so the
decoder layers, the output head and the FSDP2 units stay where trainer/model.py looks for them; a target's
weight becomes `<module>.base_layer.weight` and its adapter `<module>.lora_{A,B}.default.weight`.
`base_name` maps every name back to the base model's.

The engines serve merged weights, W + scale * B @ A, computed on the trainer from full tensors: only the
modules an adapter changes travel (embeddings, norms, the head and untargeted linears never change), and
the engine loads them with its usual loader (docs/weights.md says why not vLLM's own LoRA on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from rl.core.config import LoraConfig

ADAPTER = "default"
#: vLLM fuses these linears into one layer (qkv_proj, gate_up_proj) and its in-place reload rebuilds a fused
#: layer from what arrives, so a sync sends every part of a fused layer whose any part has an adapter.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def peft_config(cfg: LoraConfig, base_model: Optional[str] = None) -> Any:
    try:
        from peft import LoraConfig as PeftLoraConfig
    except ImportError:
        raise ImportError("model.lora.rank > 0 needs PEFT in the trainer's Python: pip install -e '.[lora]' "
                          "(or pip install 'peft>=0.15')") from None

    return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                          lora_dropout=cfg.dropout, bias="none", base_model_name_or_path=base_model)


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Inject adapters into `model` in place and freeze everything else (B starts at zero: the model's
    outputs are unchanged until the first step)."""
    config = peft_config(cfg)  # first: its import error says how to install PEFT
    from peft import inject_adapter_in_model

    try:
        model = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:
        if "target" not in str(exc).lower():
            raise
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"Recipe key 'model.lora.target_modules' = {list(cfg.target_modules)} matches no layer of "
                         f"{type(model).__name__}; its linear layers are {linears} ({exc})") from None
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))
    model.streamrl_lora = cfg  # the export writes it as the adapter's config
    return model


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The base model's name of a parameter of the injected model (`x.base_layer.weight` -> `x.weight`)."""
    return name.replace(".base_layer.", ".")


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """Module path -> PEFT LoRA layer, for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def has_lora(model: torch.nn.Module) -> bool:
    """Whether the model carries adapters (without importing PEFT: full fine-tuning does not need it)."""
    return any(is_adapter(n) for n, _ in model.named_parameters())


@dataclass(frozen=True)
class SyncTensor:
    """One tensor a sync sends: the engine's (base) name, and the state-dict keys it is made of (one plain
    entry for a full sync or an unadapted module)."""

    name: str
    weight: str  # the base tensor's state-dict key
    lora_a: Optional[str] = None  # set for an adapted weight: merged as weight + scale * B @ A
    lora_b: Optional[str] = None
    scale: float = 0.0
    transpose: bool = False  # PEFT's fan_in_fan_out (Conv1D layers store W transposed)


def sync_tensors(model: torch.nn.Module) -> list[SyncTensor]:
    """What a sync sends, in state-dict order: every parameter of the adapted modules (weights merged) and
    of the unadapted parts of their fused layers (unchanged, so that vLLM rebuilds whole fused layers)."""
    layers = lora_layers(model)
    send = set(layers)
    for path in layers:
        parent, _, leaf = path.rpartition(".")
        for group in FUSED:
            if leaf in group:
                send.update(f"{parent}.{g}" for g in group)
    out = []
    for key in model.state_dict():
        if is_adapter(key):
            continue
        module, _, pname = base_name(key).rpartition(".")
        if module not in send:
            continue
        layer = layers.get(module)
        if layer is not None and pname == "weight":
            out.append(SyncTensor(base_name(key), key, f"{module}.lora_A.{ADAPTER}.weight",
                                  f"{module}.lora_B.{ADAPTER}.weight", float(layer.scaling[ADAPTER]),
                                  bool(getattr(layer, "fan_in_fan_out", False))))
        else:
            out.append(SyncTensor(base_name(key), key))
    return out


def merged(t: SyncTensor, state: dict[str, torch.Tensor], full: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The full tensor the engine gets; `full` gathers a shard (a collective: every rank calls, same order)."""
    w = full(state[t.weight])
    if t.lora_a is None:
        return w
    a, b = full(state[t.lora_a]).float(), full(state[t.lora_b]).float()
    delta = b @ a * t.scale
    return w.float() + (delta.T if t.transpose else delta)


def merged_state(model: torch.nn.Module, full_state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The whole merged model under the base model's names, from an unsharded state dict (the export)."""
    adapted = {t.weight: t for t in sync_tensors(model) if t.lora_a is not None}
    for key, value in full_state.items():
        if is_adapter(key):
            continue
        yield base_name(key), merged(adapted[key], full_state, lambda x: x) if key in adapted else value


def adapter_state(full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors under the names PEFT's `adapter_model.safetensors` uses."""
    return {"base_model.model." + k.replace(f".{ADAPTER}.", "."): v for k, v in full_state.items() if is_adapter(k)}
