"""streamrl against TRL's GRPOTrainer: the same model, prompts, batch and reward, one system after another.

On CUDA (the default where there is a GPU): a random-init Llama of Qwen2-0.5B's shape (bf16, vocab 151,936)
built locally, 16 prompts x 8 samples a step, 64-token prompts, at most 512 new tokens, a cheap reward
(response length); TRL with vLLM in colocate mode, streamrl in each placement that fits the machine
(timeshare at eta 0, share at eta 1 and 2; separate at eta 1 with two GPUs or more). On CPU: the default
recipe's warm-started tiny model, arithmetic task and batch (16 x 8, 8 tokens, lr 5e-4, clip 0.2/0.28),
TRL with HF generate; also the time each system takes to reach a reward level.

Each system runs in a child process of its own (a fresh CUDA context, GPU memory given back between
systems) under a time limit; a system that fails is reported and the others still run. Samples/s is
trained samples over the steps after the warm-up, from the end of the last warm-up step to the end of the
last step, the same clock for every system; ratios are each system's samples/s over TRL's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rl.bench import print_table, run_recipe, time_to_reward

QWEN05 = dict(arch="llama", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
              vocab_size=151936)
BREAKDOWN = ["time/wait_rollout_s", "time/sleep_s", "time/train_s", "time/sync_s", "time/wake_s", "sync/pause_s",
             "sync/engine_s", "sync/cut_requests", "time/wait_batch_s", "time/update_s", "staleness/mean"]


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--systems", default="", help="comma list of trl and PLACEMENT-etaN (e.g. share-eta1); "
                                                  "default: every placement that fits the machine")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per system (default: 8 on CUDA, 200 on CPU)")
    p.add_argument("--warmup", type=int, default=0, help="first steps left out of the timing (default: 2 / 5)")
    p.add_argument("--batch-groups", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens per sample (default: 512 on CUDA, 8 on CPU)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (CUDA workload)")
    p.add_argument("--gpu-mem", type=float, default=0.35, help="vLLM's share of the GPU, both systems")
    p.add_argument("--micro-batch-tokens", type=int, default=0,
                   help="streamrl's trainer token budget on CUDA (default: 16384 on a GPU of >= 120 GB, else 8192)")
    p.add_argument("--trl-micro-batch", type=int, default=0,
                   help="TRL's per-device train batch on CUDA, the same tokens (default: 32, or 16 below 120 GB)")
    p.add_argument("--target", type=float, default=0.45, help="reward level for time-to-reward (CPU)")
    p.add_argument("--window", type=int, default=10, help="steps in the moving mean of reward")
    p.add_argument("--system-timeout", type=float, default=0, help="seconds per system (default: 420 CUDA, 900 CPU)")
    p.add_argument("--model-path", default="", help="a local HF model (default: built as above)")
    p.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------------- the workloads
def length_score(sample: Any) -> float:
    """The throughput runs' reward: response length over the budget (the TRL side computes the same)."""
    return len(sample.response_ids) / float(sample.row.get("max_tokens", 512))


def gpu_gib() -> float:
    """GPU 0's memory, read without making a CUDA context in this process (it would hold memory all run)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        return float(out.stdout.split()[0]) / 1024
    except Exception:
        return 0.0


def default_systems(device: str, gpus: int) -> list[str]:
    if device == "cpu":
        return ["trl", "separate-eta1"]
    return ["trl", "timeshare-eta0", "share-eta1", "share-eta2"] + (["separate-eta1"] if gpus >= 2 else [])


def _gpu_model(work: Path) -> str:
    """A random-init Llama of Qwen2-0.5B's shape with the char tokenizer, in fp32 on disk (loaded as bf16)."""
    from rl.core.config import TinyModelConfig
    from rl.models import build_random_model

    out = Path(tempfile.gettempdir()) / "streamrl-bench-vs-trl-qwen05"
    if not (out / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        build_random_model(TinyModelConfig(**QWEN05, max_position_embeddings=2048, warm_start_steps=0), tmp)
        tmp.rename(out)
    return str(out)


def _gpu_prompts(args: argparse.Namespace, n: int) -> list[dict[str, Any]]:
    """Distinct prompts of --prompt-len tokens with the char tokenizer (BOS + characters)."""
    from rl.models import CHARS

    rng = random.Random(args.seed)
    return [{"prompt": "".join(rng.choice(CHARS[33:]) for _ in range(args.prompt_len - 1)), "answer": "",
             "max_tokens": args.max_tokens} for _ in range(n)]


def workload(args: argparse.Namespace, device: str, work: Path) -> dict[str, Any]:
    """What both systems get: model, prompts (also as a JSONL file for streamrl), reward, batch, optimizer."""
    common = {"batch_groups": args.batch_groups, "group_size": args.group_size, "steps": args.steps,
              "warmup_steps": args.warmup, "seed": args.seed, "temperature": 1.0, "clip_low": 0.2, "clip_high": 0.28}
    if device == "cpu":
        from rl.core.config import load_recipe
        from rl.data import synthetic_task
        from rl.models import make_tiny_model

        r = load_recipe("recipes/cpu_default.yaml")
        task = synthetic_task(r.data)
        model = args.model_path or str(make_tiny_model(r.model.tiny, task, r.model.cache_dir))
        prompts = task.rows(args.batch_groups * (args.steps + 4), seed=args.seed + 11)
        return {**common, "device": "cpu", "model_path": model, "prompts": prompts, "reward": "arithmetic_exact",
                "max_new_tokens": r.rollout.max_tokens, "lr": r.trainer.lr, "dtype": "float32", "use_vllm": False,
                "micro_batch_size": args.batch_groups * args.group_size,  # streamrl's CPU default: one micro-batch
                "recipe": "recipes/cpu_default.yaml", "overrides": [f"model.path={model}"]}
    model = args.model_path or _gpu_model(work)
    prompts = _gpu_prompts(args, args.batch_groups * (args.steps + 4))
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    max_len = args.prompt_len + args.max_tokens + 64
    overrides = [
        f"model.path={model}", "model.dtype=bfloat16", f"data.source={data}", "data.prompt_key=prompt", "data.template=",
        "data.chat_template=false", "reward.fn=rl.bench.vs_trl:length_score", f"rollout.max_tokens={args.max_tokens}",
        f"rollout.max_model_len={max_len}", f"rollout.group_size={args.group_size}",
        f"trainer.batch_groups={args.batch_groups}", f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
        "rollout.enforce_eager=false", f"rollout.gpu_memory_utilization={args.gpu_mem}", "trainer.lr=1e-6",
        "resources.device=cuda",
    ]
    return {**common, "device": "cuda", "model_path": model, "prompts": prompts, "reward": "length",
            "max_new_tokens": args.max_tokens, "lr": 1e-6, "dtype": "bfloat16", "max_model_len": max_len,
            "use_vllm": True, "vllm_gpu_memory_utilization": args.gpu_mem, "micro_batch_size": args.trl_micro_batch,
            "recipe": None, "overrides": overrides}


# ----------------------------------------------------------------------------------- one system (a child process)
def run_streamrl(spec: dict[str, Any]) -> dict[str, Any]:
    """streamrl in the spec's placement at its eta; per-step end times, rewards and lengths, time breakdown."""
    import ray

    placement, eta = spec["system"].rsplit("-eta", 1)
    try:
        records, t_loop, setup_s = run_recipe(
            spec["recipe"], [*spec["overrides"], f"resources.placement={placement}", f"algorithm.eta={eta}",
                             f"trainer.total_steps={spec['steps']}", f"seed={spec['seed']}"],
            tempfile.mkdtemp(prefix=f"streamrl-vs-trl-{spec['system']}-"))
    finally:
        ray.shutdown()
    measured = records[spec["warmup_steps"]:]
    return {"system": spec["system"], "steps": len(records), "start_time": t_loop, "setup_seconds": setup_s,
            "step_end_times": [r["time"] for r in records], "rewards": [r["reward/mean"] for r in records],
            "completion_len": [r["response/len_mean"] for r in records],
            "samples_per_step": spec["batch_groups"] * spec["group_size"],
            "breakdown": {k: statistics.median(r[k] for r in measured) for k in BREAKDOWN if all(k in r for r in measured)}}


def _child(system: str, spec: dict[str, Any], work: Path, timeout_s: float) -> dict[str, Any]:
    """Run one system in a fresh process; its result, or the error and the tail of its log."""
    spec_file, out_file, log_file = (work / f"{system}.{x}" for x in ("spec.json", "result.json", "log"))
    spec_file.write_text(json.dumps({**spec, "system": system}))
    module = "rl.bench.trl_grpo" if system == "trl" else "rl.bench.vs_trl"
    t0 = time.time()
    with open(log_file, "w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", module, str(spec_file), str(out_file)], stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s, start_new_session=True)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log_file.read_text(errors="replace")[-3000:]
    if rc != 0 or not out_file.exists():
        return {"system": system, "error": f"exit {rc} after {time.time() - t0:.0f} s", "log_tail": tail}
    return {**json.loads(out_file.read_text()), "wall_seconds": time.time() - t0}


# ----------------------------------------------------------------------------------- figures
def summarize(res: dict[str, Any], warmup: int, target: float, window: int) -> dict[str, Any]:
    """Samples/s and tokens/s over the steps after the warm-up, and the time to a reward level."""
    if "error" in res:
        return res
    ends, n = res["step_end_times"], res["samples_per_step"]
    if len(ends) <= warmup:
        return {**res, "error": f"only {len(ends)} steps ran (warm-up {warmup})"}
    elapsed = ends[-1] - ends[warmup - 1] if warmup else ends[-1] - res["start_time"]
    steps = len(ends) - warmup
    length = statistics.mean(res["completion_len"][warmup:])
    out = {k: v for k, v in res.items()
           if k not in ("step_end_times", "step_seconds", "rewards", "completion_len", "log_tail", "vllm_logp_diff")}
    out.update(s_per_step=elapsed / steps, samples_per_s=n * steps / elapsed, tokens_per_s=n * steps * length / elapsed,
               completion_len_mean=length, reward_first=res["rewards"][0], reward_last=res["rewards"][-1],
               time_to_reward_s=time_to_reward(res["rewards"], ends, res["start_time"], target, window))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    args.steps = args.steps or (8 if device == "cuda" else 200)
    args.warmup = args.warmup or (2 if device == "cuda" else 5)
    args.max_tokens = args.max_tokens or (512 if device == "cuda" else 8)
    big = device == "cuda" and gpu_gib() >= 120  # an H200: a micro-batch of ~16k tokens of 152k-vocab logits fits
    args.micro_batch_tokens = args.micro_batch_tokens or (16384 if big else 8192)
    args.trl_micro_batch = args.trl_micro_batch or (32 if big else 16)
    timeout_s = args.system_timeout or (420 if device == "cuda" else 900)
    systems = [s for s in args.systems.split(",") if s] or default_systems(device, gpus)
    work = Path(tempfile.mkdtemp(prefix="streamrl-bench-vs-trl-"))
    spec = workload(args, device, work)
    results: dict[str, dict[str, Any]] = {}
    for system in systems:
        print(f"[vs-trl] {system}: running (limit {timeout_s:.0f} s) ...", flush=True)
        res = summarize(_child(system, spec, work, timeout_s), args.warmup, args.target, args.window)
        results[system] = res
        if args.out:  # a cut-off run keeps the systems measured so far
            Path(f"{args.out}.partial").write_text(json.dumps(results, default=float))
        print(f"[vs-trl] {system}: " + (f"FAILED {res['error']}\n{res.get('log_tail', '')}" if "error" in res else
                                        f"{res['samples_per_s']:.1f} samples/s, {res['s_per_step']:.2f} s/step"),
              flush=True)
    trl = results.get("trl", {}).get("samples_per_s")
    timeshare = results.get("timeshare-eta0", {}).get("samples_per_s")
    rows = []
    for system, res in results.items():
        ok = "error" not in res
        rows.append({"system": system, "samples/s": res["samples_per_s"] if ok else "failed",
                     "s/step": res["s_per_step"] if ok else "", "tokens/s": res["tokens_per_s"] if ok else "",
                     "len": res["completion_len_mean"] if ok else "",
                     "x TRL": res["samples_per_s"] / trl if ok and trl else "",
                     "reward first->last": f"{res['reward_first']:.3f}->{res['reward_last']:.3f}" if ok else "",
                     f"time to {args.target} (s)": (res["time_to_reward_s"] or "not reached") if ok else "",
                     "setup s": res.get("setup_seconds", "") if ok else ""})
    print_table(rows, title=f"vs TRL on {device}: {args.batch_groups} prompts x {args.group_size} samples, "
                            f"<= {args.max_tokens} tokens, {args.steps} steps ({args.warmup} warm-up)")
    ratios = {f"{s}_over_trl": r["samples_per_s"] / trl for s, r in results.items()
              if s != "trl" and "error" not in r and trl}
    if timeshare and "share-eta1" in results and "error" not in results["share-eta1"]:
        ratios["share-eta1_over_timeshare-eta0"] = results["share-eta1"]["samples_per_s"] / timeshare
    for s, r in results.items():
        if r.get("breakdown"):
            print(f"[vs-trl] {s} medians per step: " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown"].items()))
    return {"device": device, "workload": {k: v for k, v in spec.items() if k not in ("prompts", "overrides")},
            "streamrl_overrides": spec["overrides"], "systems": results, "ratios": ratios, "work_dir": str(work)}


def main() -> None:
    """`python -m rl.bench.vs_trl SPEC.json OUT.json`: one streamrl system (the benchmark's child process)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    res = run_streamrl(spec)
    Path(sys.argv[2]).write_text(json.dumps(res))
    print(json.dumps({k: v for k, v in res.items() if k in ("system", "steps", "setup_seconds")}))


if __name__ == "__main__":
    main()
