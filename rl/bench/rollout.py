"""Rollout throughput: plain vLLM `LLM.generate` versus streamrl's rollout workers, same engine settings.

(a) baseline: one `vllm.LLM` in a child process generates every request in one call;
(b) streamrl: RolloutWorker actor(s) behind the router, each sample streamed to the data store as it
finishes. Same prompts (token ids), same sampling (temperature 1, per-token logprobs, ignore EOS so every
request makes exactly --max-tokens), same engine settings. Output tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rl.bench import print_table


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", default=None, help="HF model dir (default: a random-init model of the shape below)")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--vocab", type=int, default=0, help="embedding rows (0: the char tokenizer's)")
    p.add_argument("--prompts", type=int, default=256, help="distinct prompts")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-gib", type=float, default=1.0)
    p.add_argument("--gpu-mem", type=float, default=0.5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best is reported)")
    p.add_argument("--baseline-child", default=None, help=argparse.SUPPRESS)


def _model(args: argparse.Namespace) -> str:
    if args.model_path:
        return args.model_path
    from rl.core.config import TinyModelConfig
    from rl.models import build_random_model

    spec = TinyModelConfig(arch=args.arch, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                           num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
                           max_position_embeddings=max(256, args.prompt_len + args.max_tokens + 8), warm_start_steps=0)
    out = Path(tempfile.gettempdir()) / f"streamrl-bench-rollout-{args.arch}-{args.hidden}-{args.layers}-{args.vocab}"
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        build_random_model(spec, out)
    return str(out)


def _prompts(args: argparse.Namespace) -> list[list[int]]:
    rng = random.Random(0)
    return [[1] + [rng.randint(3, 97) for _ in range(args.prompt_len - 1)] for _ in range(args.prompts)]


def _engine_kwargs(args: argparse.Namespace, model: str) -> dict[str, Any]:
    return dict(model=model, tensor_parallel_size=args.tp, dtype=args.dtype,
                max_model_len=args.prompt_len + args.max_tokens + 8, max_num_seqs=args.max_num_seqs,
                enforce_eager=args.device == "cpu", enable_prefix_caching=False,
                gpu_memory_utilization=args.gpu_mem, logprobs_mode="processed_logprobs", seed=0)


def _child_baseline(spec_path: str) -> None:
    """Runs in a child process: plain vLLM offline generation, prints one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["engine"])
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"] for _ in range(spec["n"])]
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=1.0, ignore_eos=True, logprobs=0,
                            detokenize=False)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        best = max(best, tokens / dt)
        print(f"plain vLLM repeat: {tokens / dt:,.0f} tokens/s", file=sys.stderr, flush=True)
    print("BASELINE " + json.dumps({"tokens_per_s": best, "tokens": tokens}), flush=True)


def _baseline(args: argparse.Namespace, engine: dict[str, Any], prompts: list[list[int]]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"engine": engine, "prompts": prompts, "n": args.n, "max_tokens": args.max_tokens,
                   "repeats": args.repeats}, f)
    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(args.kv_gib)))))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    out = subprocess.run([sys.executable, "-m", "rl.bench.rollout", "--baseline-child", f.name], env=env,
                         stdout=subprocess.PIPE, text=True, timeout=1800)  # its stderr (progress, errors) shows
    lines = [line for line in out.stdout.splitlines() if line.startswith("BASELINE ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"the plain vLLM baseline (a child process) failed with rc {out.returncode}: its output is above")
    return json.loads(lines[-1][len("BASELINE "):])


def _streamrl(args: argparse.Namespace, model: str, prompts: list[list[int]]) -> dict[str, Any]:
    import ray

    from datastore.client import DataStore
    from rl.core.config import RolloutConfig
    from rollout.router import RolloutRouter
    from rollout.records import GroupRequest
    from rollout.worker import SAMPLE_FIELDS, RolloutActor

    ray.init(num_cpus=max(4, 2 * args.engines + 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "ERROR"}})
    try:
        cfg = RolloutConfig(num_engines=args.engines, tensor_parallel_size=args.tp, max_tokens=args.max_tokens,
                            max_model_len=args.prompt_len + args.max_tokens + 8, max_num_seqs=args.max_num_seqs,
                            kv_cache_gib=args.kv_gib, gpu_memory_utilization=args.gpu_mem,
                            enforce_eager=args.device == "cpu", ignore_eos=True, detokenize=False, group_size=args.n)
        store = DataStore.create(args.engines, tag_fields=["version"], declared_fields=SAMPLE_FIELDS)
        gpus = args.tp if args.device == "cuda" else 0
        workers = [RolloutActor.options(num_gpus=gpus).remote(i, model, cfg, store, "bench", args.dtype, args.device, 0, 1800)
                   for i in range(args.engines)]
        ray.get([w.start.remote() for w in workers], timeout=1800)
        router = RolloutRouter(workers, args.max_tokens, 1800)
        best, tokens = 0.0, 0
        for rep in range(args.repeats):
            base = rep * len(prompts)
            reqs = [GroupRequest(group=base + g, prompt="", prompt_ids=p, row="", n=args.n) for g, p in enumerate(prompts)]

            async def go() -> list[dict[str, Any]]:
                return await asyncio.gather(*[router.run_group(r) for r in reqs])

            t0 = time.perf_counter()
            res = asyncio.run(go())
            dt = time.perf_counter() - t0
            tokens = sum(r.tokens for r in res)
            best = max(best, tokens / dt)
            print(f"streamrl repeat {rep + 1}/{args.repeats}: {tokens / dt:,.0f} tokens/s", file=sys.stderr, flush=True)
        stored = store.stats()
        for w in workers:
            ray.get(w.shutdown.remote(), timeout=120)
        return {"tokens_per_s": best, "tokens": tokens, "rows_in_store": stored.get("rows_held", stored.get("rows"))}
    finally:
        ray.shutdown()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(args)
    prompts = _prompts(args)
    engine = _engine_kwargs(args, model)
    base = _baseline(args, engine, prompts)
    print(f"plain vLLM: {base['tokens_per_s']:,.0f} tokens/s; now streamrl's rollout worker(s)", file=sys.stderr, flush=True)
    ours = _streamrl(args, model, prompts)
    print(f"streamrl: {ours['tokens_per_s']:,.0f} tokens/s", file=sys.stderr, flush=True)
    ratio = ours["tokens_per_s"] / base["tokens_per_s"]
    print_table([
        {"path": "plain vLLM LLM.generate", "engines": 1, "requests": len(prompts) * args.n,
         "output tokens": base["tokens"], "tokens/s": base["tokens_per_s"]},
        {"path": "streamrl RolloutWorker(s)", "engines": args.engines, "requests": len(prompts) * args.n,
         "output tokens": ours["tokens"], "tokens/s": ours["tokens_per_s"]},
    ], title=f"rollout throughput ({args.device}, tp={args.tp}, max_tokens={args.max_tokens}); ratio {ratio:.3f}")
    return {"plain_vllm_tokens_per_s": base["tokens_per_s"], "streamrl_tokens_per_s": ours["tokens_per_s"],
            "ratio": ratio, "device": args.device, "engines": args.engines, "tp": args.tp,
            "requests": len(prompts) * args.n, "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs,
            "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "path": args.model_path}}


if __name__ == "__main__":
    ns = argparse.ArgumentParser()
    add_args(ns)
    a = ns.parse_args()
    if a.baseline_child:
        _child_baseline(a.baseline_child)
