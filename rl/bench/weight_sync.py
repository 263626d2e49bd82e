"""Weight sync: seconds and GB/s per sync, beside the link's bandwidth measured in the same run.

A random-init model of the given shape (e.g. `--arch qwen2 --hidden 896 --layers 24 --vocab 151936` is
Qwen2-0.5B's), a trainer group of M FSDP2 ranks and E vLLM engines of tensor-parallel size t on real Ray,
and for each transport: open the weight channel, then per sync run `WeightSync.push` (rl/weight_sync.py) (the code
a training run uses): the trainer's gather (full_tensor + cast + pack), the transfer, the engines' load,
each timed. The link baseline is a probe through the same channel and the same group: the same bytes in
the same buckets, with no gather and no load (for ipc: one device copy per bucket): `link_s` is its
transfer once every receiver is there (shm: the file written and read), `probe_s` the whole probe with
its Ray and vLLM calls. GB/s counts the bytes of one copy of the weights in the engine dtype.

CPU: `--transport gloo,shm` (default). One GPU: `--transport ipc` (trainer and engine share it).
Two or more GPUs: `--transport nccl` (trainer ranks and engines on different GPUs).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from rl.bench import print_table
from rl.core.waits import wait
from rollout.worker import RolloutActor, stop_workers
from trainer.group import TrainerGroup
from trainer.worker import TrainerActor

PARTITION = "bench"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF model dir (default: a random-init model of the shape below)")
    p.add_argument("--arch", default="qwen2", choices=["llama", "qwen2"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=0, help="attention heads (0: hidden / 64)")
    p.add_argument("--kv-heads", type=int, default=0, help="KV heads (0: heads / 7 rounded, at least 1)")
    p.add_argument("--intermediate", type=int, default=0, help="MLP width (0: about 5.4 x hidden, like Qwen2)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--transport", default="", help="comma list of shm,gloo,nccl,ipc (default: gloo,shm on CPU, "
                                                 "ipc on one GPU, nccl on more)")
    p.add_argument("--trainer-ranks", type=int, default=1, help="M: FSDP2 ranks of the trainer")
    p.add_argument("--engines", type=int, default=1, help="E: vLLM engines")
    p.add_argument("--tp", type=int, default=1, help="t: tensor-parallel size of each engine")
    p.add_argument("--dtype", default="", help="engine dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--bucket-mb", type=float, default=256.0)
    p.add_argument("--syncs", type=int, default=3, help="timed syncs per transport (median reported)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--gpu-mem", type=float, default=0.3, help="vLLM gpu_memory_utilization per engine")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--lora-rank", type=int, default=0, help="model.lora.rank: sync merged LoRA targets only (0: full)")


# ------------------------------------------------------------------------------------------------ setup
def _shape(args: argparse.Namespace) -> dict[str, int]:
    heads = args.heads or max(1, args.hidden // 64)
    kv = args.kv_heads or max(1, round(heads / 7))
    while heads % kv:
        kv -= 1
    inter = args.intermediate or int(round(args.hidden * 5.4 / 64)) * 64
    return {"hidden": args.hidden, "layers": args.layers, "heads": heads, "kv_heads": kv, "intermediate": inter,
            "vocab": args.vocab}


def _model(args: argparse.Namespace) -> str:
    if args.model_path:
        return args.model_path
    from rl.core.config import TinyModelConfig
    from rl.models import build_random_model

    s = _shape(args)
    spec = TinyModelConfig(arch=args.arch, hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"],
                           num_kv_heads=s["kv_heads"], intermediate_size=s["intermediate"], vocab_size=s["vocab"],
                           max_position_embeddings=256, warm_start_steps=0)
    name = f"streamrl-bench-wsync-{args.arch}-" + "-".join(f"{k}{v}" for k, v in s.items())
    out = Path(tempfile.gettempdir()) / name
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        build_random_model(spec, out)
    return str(out)


def _pinned(gpus: str) -> dict[str, Any]:
    """Actor options that show it these GPUs (by index on this host) without Ray reserving them, so a
    trainer rank and an engine worker can share one (CUDA IPC)."""
    return {"num_gpus": 0, "runtime_env": {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
                                                        "CUDA_VISIBLE_DEVICES": gpus}}}


def build_actors(recipe: Any, model_path: str, store: Any, colocate: bool) -> tuple[Any, list[Any]]:
    """A started trainer group and engines for `recipe`. colocate (one host): engine e's worker k sees GPU
    (e * tp + k) mod M and trainer rank r sees GPU r (Ray reserves none of them); otherwise Ray places
    trainer ranks and engines on GPUs of their own (or on CPUs). Engines start first: vLLM sizes its
    KV cache from the free GPU memory."""
    r, device = recipe, recipe.resources.device
    tp, m, e = r.rollout.tensor_parallel_size, r.trainer.world_size, r.rollout.num_engines
    if colocate:
        if tp > m:
            raise ValueError(f"ipc: an engine of tp={tp} GPUs shares them with the trainer's ranks, so it needs "
                             f"trainer.world_size >= {tp} (got {m})")
        opts = [_pinned(",".join(str((i * tp + k) % m) for k in range(tp))) for i in range(e)]
    else:
        opts = [{"num_gpus": tp if device == "cuda" else 0} for _ in range(e)]
    workers = [RolloutActor.options(**o).remote(i, model_path, r.rollout, store, PARTITION, r.model.dtype, device,
                                                r.seed, r.resources.wait_timeout_s) for i, o in enumerate(opts)]
    wait([w.start.remote() for w in workers], r.resources.wait_timeout_s, "vLLM engine start", "bench engines")
    group = PinnedTrainerGroup(r, model_path, store) if colocate else TrainerGroup(r, model_path, store, PARTITION,
                                                                                  device)
    group.setup()
    return group, workers


class PinnedTrainerGroup(TrainerGroup):
    """Trainer rank r on GPU r of this host, not reserved in Ray, so engines can share the GPUs
    (TrainerGroup itself reserves whole GPUs through a placement group)."""

    def __init__(self, recipe: Any, model_path: str, store: Any) -> None:  # noqa: super() would reserve GPUs
        self.recipe, self.timeout, self.run_dir, self.pg = recipe, recipe.resources.wait_timeout_s, None, None
        self.ranks = [TrainerActor.options(**_pinned(str(i))).remote(i, recipe, model_path, store, PARTITION, "cuda")
                      for i in range(recipe.trainer.world_size)]

    def shutdown(self) -> None:
        try:
            wait([x.shutdown.remote() for x in self.ranks], 60, "shutdown", "trainer ranks")
        except Exception:
            pass
        for x in self.ranks:
            ray.kill(x)


# ------------------------------------------------------------------------------------------------ run
def _recipe(args: argparse.Namespace, model: str, device: str, transport: str) -> Any:
    from rl.core.config import load_recipe

    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    return load_recipe(None, [
        f"model.path={model}", f"model.dtype={dtype}", f"trainer.world_size={args.trainer_ranks}",
        f"trainer.batch_groups={args.trainer_ranks}", f"rollout.num_engines={args.engines}",
        f"rollout.tensor_parallel_size={args.tp}", f"rollout.weight_transport={transport}",
        f"rollout.weight_bucket_mb={args.bucket_mb}", f"rollout.gpu_memory_utilization={args.gpu_mem}",
        "rollout.max_model_len=128", "rollout.max_num_seqs=16", "rollout.kv_cache_gib=0.5",
        "algorithm.eta=0", f"model.lora.rank={args.lora_rank}",
        f"resources.device={device}", f"resources.wait_timeout_s={args.timeout}",
        f"logging.run_dir={tempfile.mkdtemp(prefix='streamrl-bench-wsync-')}",
    ])


async def _measure(ws: Any, syncs: int) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    await ws.push()  # warm-up: first buffers, first loads
    await ws.push(probe=True)
    real, probe = [], []
    for _ in range(syncs):
        real.append(await ws.push())
        probe.append(await ws.push(probe=True))
    return real, probe


def _med(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _logprob_diff(group: Any, worker: Any, vocab: int) -> float:
    ids = [1] + [3 + (7 * i) % min(vocab - 3, 90) for i in range(24)]
    t = group.sequence_logprobs(ids)
    e = ray.get(worker.prompt_logprobs.remote(ids), timeout=120)
    return max(abs(a - b) for a, b in zip(t[1:], e[1:]))


def _device_copy_gbps(nbytes: int) -> float:
    """A plain device-to-device copy of the same bytes in this process (the IPC link)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / 5
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / secs / 1e9


def _one_transport(args: argparse.Namespace, model: str, device: str, transport: str, store: Any) -> dict[str, Any]:
    from rl.weight_sync import WeightSync

    recipe = _recipe(args, model, device, transport)
    group, workers = build_actors(recipe, model, store, colocate=transport == "ipc")
    try:
        r = recipe
        ws = WeightSync(group, workers, r.rollout.weight_transport, r.rollout.tensor_parallel_size, device,
                         colocated=transport == "ipc", timeout_s=r.resources.wait_timeout_s)
        t0 = time.perf_counter()
        ws.open()
        open_s = time.perf_counter() - t0
        real, probe = asyncio.run(_measure(ws, args.syncs))
        diff = _logprob_diff(group, workers[0], args.vocab)
    finally:
        stop_workers(workers)
        group.shutdown()
    gb = real[0]["sync/bytes"] / 1e9
    total, whole_probe = _med(real, "sync/total_s"), _med(probe, "sync/total_s")
    # the link: the probe's bytes moving once every receiver is there (shm: written, then read)
    link = statistics.median(p["sync/transfer_s"] + (p["sync/recv_s"] if transport == "shm" else 0.0) for p in probe)
    return {"transport": transport, "M": args.trainer_ranks, "E": args.engines, "tp": args.tp,
            "dtype": recipe.model.dtype, "GB": gb, "open_s": open_s,
            "gather_s": _med(real, "sync/gather_s"), "send_s": _med(real, "sync/send_s"),
            "recv_s": _med(real, "sync/recv_s"), "load_s": _med(real, "sync/load_s"), "sync_s": total,
            "GB/s": gb / total, "link_s": link, "link_GB/s": gb / link, "of_link": link / total,
            "probe_s": whole_probe, "of_probe": whole_probe / total, "max_logprob_diff": diff}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from datastore.client import DataStore
    from rl.controller import pick_device
    from rollout.worker import SAMPLE_FIELDS

    device = pick_device(args.device)
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    default = "gloo,shm" if device == "cpu" else ("ipc" if gpus == 1 else "nccl")
    transports = [t.strip() for t in (args.transport or default).split(",") if t.strip()]
    model = _model(args)
    if not ray.is_initialized():
        need = 2 * (args.trainer_ranks + args.engines) + 2
        ray.init(num_cpus=max(need, 4), include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}})
    store = DataStore.create(1, tag_fields=["version"], declared_fields=SAMPLE_FIELDS, timeout_s=args.timeout)
    rows = []
    try:
        for t in transports:
            rows.append(_one_transport(args, model, device, t, store))
            print_table([rows[-1]], title=f"weight sync: {t}")
    finally:
        store.shutdown()
    print_table(rows, title=f"weight sync, {model} ({device})")
    out: dict[str, Any] = {"model": {"arch": args.arch, **_shape(args), "path": model}, "device": device,
                           "bucket_mb": args.bucket_mb, "syncs": args.syncs, "rows": rows}
    if device == "cuda" and "ipc" in transports:
        out["device_copy_GB/s"] = _device_copy_gbps(int(rows[transports.index("ipc")]["GB"] * 1e9))
        for row in rows:
            if row["transport"] == "ipc":
                row["of_device_copy"] = row["GB/s"] / out["device_copy_GB/s"]
    return out
