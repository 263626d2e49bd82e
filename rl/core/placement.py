"""Where engines and trainer ranks run (`resources.placement`), and whether they fit, before any actor starts.

    separate   a bundle of `tp` GPUs per engine, and one GPU per trainer rank (placement group of its own)
    timeshare  one bundle per GPU, holding a trainer rank and an engine or one TP shard of it; the engine
               sleeps while the trainer steps (eta = 0)
    share      the same bundles, both resident at once: the engine holds rollout.gpu_memory_utilization of
               the GPU and the trainer rank at most trainer.gpu_memory_fraction (enforced by torch), any eta

In the shared placements each actor asks for half of its bundle's GPU, so Ray puts both on the same device;
the memory split is vLLM's and torch's, not Ray's. A tensor-parallel engine spans `tp` consecutive bundles:
Ray gives its actor one of them, and it is told the others' device ids (probed from the bundles).

The fit check reads the model's shape from its config (no weights loaded) and each GPU's size from a probe
task in the reserved bundles, and refuses a run whose engine or trainer cannot hold even its fixed state in
its share, saying by how much. Those needs are lower bounds (weights, optimizer state, one sequence of KV
cache, one micro-batch of fp32 logits); activations and allocator slack come on top.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray

from rl.core.config import Recipe, RecipeError, trainer_memory_fraction
from rl.core.waits import reserve, wait

GIB = 2**30
ENGINE_OVERHEAD_GIB = 1.0  # vLLM's activations, sampler and CUDA graph pool at small batch: at least this
TRAINER_OVERHEAD_GIB = 0.5  # CUDA context, NCCL buffers, allocator fragments


@dataclass
class Placement:
    """Where a group of actors goes: bundles of a placement group and the GPU share each actor takes there.
    `devices[i]`: the GPU ids actor i must see when Ray can give it only one (tensor-parallel engines)."""

    pg: Any
    bundles: list[int]
    gpus: float
    devices: list[Optional[list[str]]] = field(default_factory=list)

    def devices_of(self, i: int) -> Optional[list[str]]:
        return self.devices[i] if i < len(self.devices) else None


@dataclass
class ModelShape:
    """What memory arithmetic needs from a model's config."""

    params: int
    hidden: int
    layers: int
    vocab: int
    kv_bytes_per_token: int  # K and V of every layer, per token, in the engine's dtype

    @classmethod
    def from_dir(cls, path: str, dtype_bytes: int) -> "ModelShape":
        """From a local HF directory's config.json (meta-device init: no memory, no weights read)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        params = sum(p.numel() for p in model.parameters())
        text = getattr(cfg, "text_config", cfg)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv = 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes
        return cls(params, text.hidden_size, text.num_hidden_layers, text.vocab_size, kv)


def memory_needs(r: Recipe, shape: ModelShape) -> dict[str, float]:
    """Lower bounds, in GiB, of what one engine shard and one trainer rank hold on their GPU."""
    dtype_bytes = 2 if r.model.dtype == "bfloat16" else 4
    tp, ranks = r.rollout.tensor_parallel_size, r.trainer.world_size
    weights = shape.params * dtype_bytes / tp
    kv_one_sequence = r.rollout.max_model_len * shape.kv_bytes_per_token / tp
    engine = (weights + kv_one_sequence) / GIB + ENGINE_OVERHEAD_GIB
    # fp32 master weights, fp32 gradients and AdamW's two moments, sharded over the ranks
    states = 16 * shape.params / ranks
    logits = 4 * shape.vocab * r.trainer.micro_batch_tokens  # one micro-batch's fp32 log-softmax (if budgeted)
    trainer = (states + logits) / GIB + TRAINER_OVERHEAD_GIB
    return {"engine_gib": engine, "engine_weights_gib": weights / GIB, "trainer_gib": trainer,
            "trainer_states_gib": states / GIB, "trainer_logits_gib": logits / GIB}


def check_fit(r: Recipe, needs: dict[str, float], gpu_gib: float) -> dict[str, float]:
    """Refuse (RecipeError) a placement whose engine or trainer share of a `gpu_gib` GPU is below its need;
    returns the shares in GiB."""
    placement, util = r.resources.placement, r.rollout.gpu_memory_utilization
    engine_share = util * gpu_gib
    trainer_share = {"share": trainer_memory_fraction(r) * gpu_gib}.get(placement, gpu_gib)
    if needs["engine_gib"] > engine_share:
        raise RecipeError(
            f"The engine does not fit: rollout.gpu_memory_utilization={util} gives it {engine_share:.1f} GiB of a "
            f"{gpu_gib:.1f} GiB GPU, and it needs at least {needs['engine_gib']:.1f} GiB (weights "
            f"{needs['engine_weights_gib']:.1f} GiB per shard, one sequence of KV cache of rollout.max_model_len="
            f"{r.rollout.max_model_len}, {ENGINE_OVERHEAD_GIB:.0f} GiB for activations): short by "
            f"{needs['engine_gib'] - engine_share:.1f} GiB. Raise rollout.gpu_memory_utilization to at least "
            f"{needs['engine_gib'] / gpu_gib:.2f}, or use more tensor parallelism")
    if needs["trainer_gib"] > trainer_share:
        key = ("trainer.gpu_memory_fraction (or lower rollout.gpu_memory_utilization)" if placement == "share"
               else "trainer.world_size (more ranks shard the state)")
        raise RecipeError(
            f"A trainer rank does not fit: it may use {trainer_share:.1f} GiB of a {gpu_gib:.1f} GiB GPU "
            f"(resources.placement={placement}) and needs at least {needs['trainer_gib']:.1f} GiB (fp32 weights, "
            f"gradients and AdamW state {needs['trainer_states_gib']:.1f} GiB per rank, one micro-batch of "
            f"logits {needs['trainer_logits_gib']:.1f} GiB): short by {needs['trainer_gib'] - trainer_share:.1f} "
            f"GiB. Raise {key}, or lower trainer.micro_batch_tokens")
    return {"engine_share_gib": engine_share, "trainer_share_gib": trainer_share}


@ray.remote(num_gpus=0.01, num_cpus=0, max_calls=1)
def _probe_gpu() -> dict[str, Any]:
    """Runs in a bundle: the GPU Ray assigned there, its size and free memory (max_calls=1: the worker
    exits afterwards, taking its CUDA context with it)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"ids": [str(i) for i in ray.get_gpu_ids()], "total": total, "free": free,
            "name": torch.cuda.get_device_name()}


def probe_bundles(pg: Any, bundles: list[int], timeout_s: float) -> list[dict[str, Any]]:
    """The GPU of each listed bundle of a reserved placement group, before any actor holds it."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    refs = [_probe_gpu.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, b)).remote() for b in bundles]
    return wait(refs, timeout_s, "a GPU size probe", f"placement group bundles {bundles}")


def reserve_placement(r: Recipe, gpu: bool) -> tuple[Placement, Optional[Placement]]:
    """Reserve the engines' (and, in a shared placement, the trainer ranks') bundles; returns where the
    engines go and where the trainer ranks go (None: a placement group of their own, made by TrainerGroup)."""
    tp, timeout, placement = r.rollout.tensor_parallel_size, r.resources.wait_timeout_s, r.resources.placement
    if placement == "separate":
        bundle = {"CPU": 1, **({"GPU": tp} if gpu else {})}
        pg = reserve([bundle] * r.rollout.num_engines, timeout, "rollout engines")
        return Placement(pg, list(range(r.rollout.num_engines)), float(tp) if gpu else 0.0), None
    n = r.trainer.world_size
    bundle = {"CPU": 2, **({"GPU": 1} if gpu else {})}
    pg = reserve([bundle] * n, timeout, f"trainer ranks and engines sharing GPUs ({placement})")
    return Placement(pg, list(range(0, n, tp)), 0.5 if gpu else 0.0), Placement(pg, list(range(n)), 0.5 if gpu else 0.0)


def engine_devices(engine_bundles: list[int], tp: int, bundle_gpus: list[list[str]]) -> list[list[str]]:
    """The GPU ids each tensor-parallel engine must see in a shared placement: those of its `tp` bundles,
    starting at its own (Ray gives the engine's actor only the first)."""
    return [[i for b in range(first, first + tp) for i in bundle_gpus[b]] for first in engine_bundles]


def plan(r: Recipe, device: str, model_path: str) -> tuple[Placement, Optional[Placement], dict[str, Any]]:
    """Reserve the run's GPUs and check that it fits (`reserve_placement`, then a probe of every bundle's
    GPU and `check_fit`); also returns what was found, for the log. Nothing is left reserved on failure."""
    engines, trainer = reserve_placement(r, device == "cuda")
    info: dict[str, Any] = {"placement": r.resources.placement}
    if device != "cuda":
        return engines, trainer, info
    tp, pg = r.rollout.tensor_parallel_size, engines.pg
    try:
        found = probe_bundles(pg, list(range(len(pg.bundle_specs))), r.resources.wait_timeout_s)
        info["gpus"] = [f"{g['name']} {g['total'] / GIB:.1f} GiB ({g['free'] / GIB:.1f} free)" for g in found]
        if trainer is not None and tp > 1:
            engines.devices = engine_devices(engines.bundles, tp, [g["ids"] for g in found])
        if Path(model_path, "config.json").exists():
            needs = memory_needs(r, ModelShape.from_dir(model_path, 2 if r.model.dtype == "bfloat16" else 4))
            info.update(needs, **check_fit(r, needs, min(g["total"] for g in found) / GIB))
    except BaseException:
        ray.util.remove_placement_group(pg)
        raise
    return engines, trainer, info


def describe(info: dict[str, Any]) -> str:
    return json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in info.items()})
