"""Training step throughput: streamrl's trainer step against a plain FSDP2 step, same model, same tokens.

Both run in the same processes (one per rank, gloo on CPU, NCCL on CUDA), interleaved round by round so
that drift of a noisy machine hits both alike:

  streamrl  trainer.engine.PolicyTrainer.train: the code a TrainerWorker runs on the samples it fetched
            (token-budget micro-batches, decoupled-PPO loss with its statistics, GRPO advantages, global
            metrics, grad clipping, AdamW, LR schedule), FSDP2 with the recipe's mixed precision.
  streamrl (fixed)  the same, but with fixed-size micro-batches (`trainer.micro_batch_size`, no budget):
            exactly the plain loop's micro-batches, so the ratio to plain is streamrl's own overhead.
  plain     a hand-written loop: fully_shard per decoder layer + root with the same MixedPrecisionPolicy,
            AdamW, fixed-size micro-batches (of the samples sorted by length, the layout that pads least)
            padded to their longest sample rounded up to the same multiple streamrl uses (`--pad-multiple`:
            without it every new micro-batch shape costs cuDNN attention a new plan, ~2 ms of host time per
            call on an H200, and the baseline would be slowed by that rather than by its own work),
            cross-entropy on the response tokens, grad clipping.

Figures: tokens/s (prompt + response tokens, no padding; the median over timed steps), the ratio (the median
over batches of plain's time / streamrl's time on the same batch, run back to back) and MFU = 6 * matmul params * tokens / time / peak
(attention score FLOPs not counted). Peak: on CPU a plain matmul measured in the same run on every rank at
once; on CUDA the device's nominal dense bf16 peak (the measured matmul is printed beside it).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import socket
import statistics
import time
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # a small llama: a CPU step of a few seconds
    "tiny": dict(arch="llama", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=4096, tie=False),
    # Qwen2-0.5B's shape (random init)
    "qwen2-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
                       tie=True),
}
# dense bf16 FLOP/s per GPU (first matching name wins: PCIe parts before their SXM siblings)
NOMINAL_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
                "A800": 312e12, "L40S": 362e12}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--world-size", type=int, default=2, help="FSDP2 ranks (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model shape (default: tiny on CPU, "
                   "qwen2-0.5b on CUDA); the options below override single fields")
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--arch", choices=["llama", "qwen2"], default=None)
    p.add_argument("--samples", type=int, default=None, help="samples per rank per step (default 32 CPU, 64 CUDA)")
    p.add_argument("--prompt-len", default=None, help="min:max prompt tokens (default 8:24 CPU, 64:256 CUDA)")
    p.add_argument("--response-len", default=None, help="min:max response tokens (default 8:40 CPU, 128:1024 CUDA)")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="streamrl's token budget per micro-batch (default: plain's micro-batch size x longest sample)")
    p.add_argument("--plain-micro-batch", type=int, default=None, help="plain loop's samples per micro-batch "
                   "(default 8 CPU, 6 CUDA)")
    p.add_argument("--packing", action="store_true", help="streamrl packs each micro-batch into one row")
    p.add_argument("--pad-multiple", type=int, default=0, help="every system rounds a micro-batch's length up to "
                   "a multiple of this (trainer.pad_multiple; 0: its auto value, 64 on CUDA, 1 on CPU)")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (each: --steps batches, every system on each)")
    p.add_argument("--steps", type=int, default=2, help="steps per system per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per system first")
    p.add_argument("--profile", default="", help="after the timed rounds, one more step of each system under "
                   "torch.profiler: rank 0 writes DIR/<system>.txt (the top operators by device time, or CPU "
                   "time on CPU)")


def _shape(args: argparse.Namespace, device: str) -> dict[str, Any]:
    shape = dict(PRESETS[args.preset or ("qwen2-0.5b" if device == "cuda" else "tiny")])
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "arch"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    return shape


def _defaults(args: argparse.Namespace, device: str) -> argparse.Namespace:
    import torch

    from trainer.model import pad_multiple

    gpu = device == "cuda"
    args.samples = args.samples or (64 if gpu else 32)
    args.prompt_len = args.prompt_len or ("64:256" if gpu else "8:24")
    args.response_len = args.response_len or ("128:1024" if gpu else "8:40")
    args.plain_micro_batch = args.plain_micro_batch or (6 if gpu else 8)
    args.multiple = pad_multiple(args.pad_multiple, torch.device(device))  # as trainer.pad_multiple resolves
    longest = int(args.prompt_len.split(":")[1]) + int(args.response_len.split(":")[1])
    args.micro_batch_tokens = args.micro_batch_tokens or args.plain_micro_batch * longest
    return args


def model_config(shape: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        shape["arch"], vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=shape["tie"], bos_token_id=1, eos_token_id=2,
        pad_token_id=0, use_cache=False)


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding, plus the LM head even
    when it shares the embedding's storage."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    return total - (0 if tied else emb.numel())


# ---------------------------------------------------------------- per rank

def _samples(args: argparse.Namespace, vocab: int, rank: int, step: int) -> list:
    import torch

    from trainer.batching import Sample

    rng = random.Random(1000 * step + rank)
    lo_p, hi_p = map(int, args.prompt_len.split(":"))
    lo_r, hi_r = map(int, args.response_len.split(":"))
    out = []
    for i in range(args.samples):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(lo_p, hi_p) - 1)]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(lo_r, hi_r))]
        behaviour = torch.full((len(response),), -math.log(vocab))
        out.append(Sample(prompt, response, behaviour, torch.ones(len(response)), float(rng.random() < 0.5),
                          i // 8, step))
    return out


class PlainStep:
    """The baseline: the loop anyone would write with fully_shard and AdamW."""

    def __init__(self, config, recipe, device, seed: int) -> None:
        import torch

        from trainer.model import decoder_layers, load_causal_lm, shard

        self.model = load_causal_lm(config, device, seed)
        shard(self.model, decoder_layers(self.model), recipe.trainer, device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=recipe.trainer.lr)
        self.device, self.recipe = device, recipe

    def step(self, samples: list, micro: int, multiple: int = 1) -> float:
        """One step; returns the share of computed token positions that were padding (over all ranks)."""
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        self.model.train()
        samples = sorted(samples, key=lambda s: -s.length)  # stable: the order the streamrl planner uses
        computed = 0
        world = dist.get_world_size()
        n_tok = torch.tensor([float(sum(len(s.response_ids) for s in samples))], device=self.device)
        dist.all_reduce(n_tok)
        for start in range(0, len(samples), micro):
            chunk = samples[start : start + micro]
            width = -(-max(s.length for s in chunk) // multiple) * multiple
            computed += width * len(chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros_like(ids)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, s in enumerate(chunk):
                seq = torch.tensor(s.prompt_ids + s.response_ids)
                ids[i, : len(seq)] = seq
                attn[i, : len(seq)] = 1
                labels[i, len(s.prompt_ids) : len(seq)] = seq[len(s.prompt_ids) :]
            ids, attn, labels = ids.to(self.device), attn.to(self.device), labels.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / n_tok
            (loss * world).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.trainer.max_grad_norm)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        counts = torch.tensor([float(sum(s.length for s in samples)), float(computed)], device=self.device)
        dist.all_reduce(counts)
        return 1.0 - counts[0].item() / counts[1].item()


def _matmul_flops(device, dtype, seconds: float = 1.5) -> float:
    """FLOP/s of a square matmul loop on this rank (all ranks run it at once)."""
    import torch

    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        count += 10
        sync()
    return 2 * n**3 * count / (time.perf_counter() - t0)

def _measure(systems: dict[str, Any], args: argparse.Namespace, vocab: int, rank: int, device) -> dict[str, Any]:
    """Run every system on the same batches, interleaved batch by batch (the order rotating each round), so
    a load spike on a shared machine hits all alike. Per step: global tokens and seconds."""
    import torch
    import torch.distributed as dist

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    pad: dict[str, list[float]] = {name: [] for name in systems}
    micro: list[float] = []

    def one(name: str, batch: list, step: int) -> float:
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        if name == "plain":
            pad[name].append(systems[name].step(batch, args.plain_micro_batch, args.multiple))
        else:
            m = systems[name].train(batch, step)
            pad[name].append(m["trainer/pad_fraction"])
            if name == "streamrl":
                micro.append(m["trainer/micro_batches"])
        sync()
        dist.barrier()
        return time.perf_counter() - t0

    step = 0
    for _ in range(args.warmup):
        batch = _samples(args, vocab, rank, step)
        for name in systems:
            one(name, batch, step)
        step += 1
    for _ in pad.values():
        _.clear()
    micro.clear()
    names = list(systems)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for _ in range(args.steps):
            batch = _samples(args, vocab, rank, step)
            n = torch.tensor([float(sum(s.length for s in batch))], device=device)
            dist.all_reduce(n)
            for name in order:
                steps[name].append((n.item(), one(name, batch, step)))
            step += 1
    return {"steps": steps, "pad": {k: sum(v) / len(v) for k, v in pad.items()},
            "micro_batches": sum(micro) / max(len(micro), 1)}


def _profile(systems: dict[str, Any], args: argparse.Namespace, vocab: int, rank: int, device) -> dict[str, str]:
    """One step of each system on the same batch under torch.profiler; rank 0 writes the operator tables
    (the answer to "where does the step's time go" when the ratio falls short)."""
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    batch = _samples(args, vocab, rank, 10_000)
    out: dict[str, str] = {}
    for name, system in systems.items():
        dist.barrier()
        with profile(activities=activities, record_shapes=False) as prof:
            t0 = time.perf_counter()
            if name == "plain":
                system.step(batch, args.plain_micro_batch, args.multiple)
            else:
                system.train(batch, 10_000)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if rank == 0:
            path = Path(args.profile) / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{name}: one step, {wall:.3f} s wall (under the profiler)\n\n"
                            + prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70))
            out[name] = str(path)
    return out


def _recipe(args: argparse.Namespace, *extra: str):
    from rl.core.config import load_recipe

    return load_recipe(None, [
        f"trainer.world_size={args.world_size}", f"trainer.compute_dtype={args.compute_dtype}",
        f"trainer.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"trainer.batch_groups={args.world_size}", "rollout.group_size=1", "trainer.lr=1e-5",
        f"trainer.pad_multiple={args.multiple}", *extra])


def _rank_main(rank: int, args: argparse.Namespace, device_kind: str, port: int, out_q) -> None:
    import torch
    import torch.distributed as dist

    from trainer.engine import PolicyTrainer
    from trainer.model import compute_dtype

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=600))
    try:
        shape = _shape(args, device_kind)
        config = model_config(shape)
        recipe = _recipe(args, f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
                         f"trainer.packing={str(args.packing).lower()}")
        ours = PolicyTrainer(recipe, config, device)
        fixed = PolicyTrainer(_recipe(args, f"trainer.micro_batch_size={args.plain_micro_batch}"), config, device)
        plain = PlainStep(config, recipe, device, recipe.seed)
        dtype = compute_dtype(recipe.trainer.compute_dtype, device)
        peak = torch.tensor([_matmul_flops(device, dtype)], dtype=torch.float64, device=device)
        dist.all_reduce(peak)
        systems = {"streamrl": ours, "streamrl_fixed": fixed, "plain": plain}
        result = _measure(systems, args, shape["vocab"], rank, device)
        if args.profile:
            result["profiles"] = _profile(systems, args, shape["vocab"], rank, device)
        if rank == 0:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            nominal = next((v * args.world_size for k, v in NOMINAL_BF16.items() if k in name), None)
            use_nominal = device.type == "cuda" and nominal is not None and dtype == torch.bfloat16
            out_q.put({
                "shape": shape, "params": sum(p.numel() for p in ours.model.parameters()),
                "matmul_params": matmul_params(ours.model), **result,
                "measured_peak": peak.item(), "peak": nominal if use_nominal else peak.item(),
                "peak_source": f"nominal bf16 dense of {name}" if use_nominal else f"measured {dtype} matmul",
                "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            })
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- driver

def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.multiprocessing as mp

    from rl.bench import print_table

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args = _defaults(args, device)
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out_q = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(args, device, port, out_q), nprocs=args.world_size, join=True,
                       start_method="spawn")
    r = out_q.get()
    rows, figures = [], {}
    labels = {"streamrl": "streamrl (token budget)", "streamrl_fixed": "streamrl (plain's micro-batches)",
              "plain": "plain FSDP2"}
    steps = r["steps"]
    for name, label in labels.items():
        tps = statistics.median(tok / sec for tok, sec in steps[name])
        mfu = 6 * r["matmul_params"] * tps / r["peak"]
        figures.update({f"{name}_tokens_per_s": tps, f"{name}_mfu": mfu, f"{name}_pad_fraction": r["pad"][name]})
        rows.append({"system": label, "tokens/s": tps, "MFU": mfu,
                     "step s": statistics.median(sec for _, sec in steps[name]), "padding": r["pad"][name]})
    # paired per batch (the same tokens, run back to back): robust to a machine whose load changes
    paired = lambda a, b: statistics.median(sb / sa for (_, sa), (_, sb) in zip(steps[a], steps[b]))  # noqa: E731
    figures["ratio"] = paired("streamrl", "plain")
    figures["ratio_same_micro_batches"] = paired("streamrl_fixed", "plain")
    figures["ratio_min"] = min(sb / sa for (_, sa), (_, sb) in zip(steps["streamrl"], steps["plain"]))
    figures["ratio_max"] = max(sb / sa for (_, sa), (_, sb) in zip(steps["streamrl"], steps["plain"]))
    rows.append({"system": "ratio streamrl / plain", "tokens/s": figures["ratio"], "MFU": "", "step s": "",
                 "padding": ""})
    rows.append({"system": "ratio, same micro-batches", "tokens/s": figures["ratio_same_micro_batches"], "MFU": "",
                 "step s": "", "padding": ""})
    print_table(rows, title=f"trainer step, {r['params'] / 1e6:.1f}M params ({r['shape']['arch']}), "
                            f"{args.world_size} x {device} ranks, {r['dtype']} compute")
    figures.update({
        "device": device, "device_name": r["device_name"], "world_size": args.world_size, "threads": args.threads,
        "compute_dtype": r["dtype"], "params": r["params"], "matmul_params": r["matmul_params"], "shape": r["shape"],
        "samples_per_rank": args.samples, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "tokens_per_step": statistics.median(tok for tok, _ in steps["streamrl"]),
        "micro_batch_tokens": args.micro_batch_tokens, "plain_micro_batch": args.plain_micro_batch,
        "pad_multiple": args.multiple,
        "streamrl_micro_batches": r["micro_batches"], "packing": args.packing,
        "activation_checkpointing": args.activation_checkpointing, "peak_flops": r["peak"],
        "peak_source": r["peak_source"], "measured_matmul_flops": r["measured_peak"],
        "rounds": args.rounds, "steps_per_round": args.steps,
    })
    if "profiles" in r:
        figures["profiles"] = r["profiles"]
    return figures
