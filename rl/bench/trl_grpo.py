"""TRL's GRPOTrainer on a local model and prompts: the peer baseline of `streamrl bench vs-trl`.

`run(spec)` trains with trl's GRPOTrainer (synchronous, on-policy: one generation per optimizer step, each step
consuming exactly batch_groups * group_size completions made by the current weights) and returns per-step
wall times, rewards and completion lengths. `python -m rl.bench.trl_grpo SPEC.json OUT.json` does the same in
a fresh process (the benchmark runs it that way, so vLLM and torch state never leak between systems).

Spec keys (see run()): model_path, prompts [{"prompt", "answer"}], reward ("arithmetic_exact" | "length"),
steps, warmup_steps, batch_groups, group_size, micro_batch_size (default group_size), max_new_tokens,
temperature, lr, clip_low, clip_high, beta, device ("cpu" | "cuda"), dtype ("float32" | "bfloat16"), use_vllm,
vllm_gpu_memory_utilization (0.3), max_model_len (default: longest prompt + max_new_tokens), seed, loss_type
(TRL's default "dapo"), gradient_checkpointing (False), param_dtype ("float32"), torch_threads, progress,
extra_args (any other GRPOConfig fields, passed through, overriding ours).

dtype follows streamrl's trainer: master weights and AdamW state stay float32 (TRL's own default); "bfloat16"
turns on bf16 autocast for training and makes vLLM generate in bf16. `param_dtype` overrides the dtype the
weights are loaded in.

vLLM (colocate mode) runs inside this process: TRL builds `vllm.LLM(distributed_executor_backend=
"external_launcher")` and itself sets RANK/LOCAL_RANK/WORLD_SIZE (and a free MASTER_PORT) just before it,
after accelerate has settled on a single non-distributed process. They must not be set before that: with
LOCAL_RANK set, accelerate would take its distributed path (a one-process NCCL group, the model wrapped in DDP).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Iterator

INSTALL_HINT = "TRL is not installed: pip install -e '.[bench]'"


def _reward_fn(kind: str, max_new_tokens: int):
    """The spec's reward as a TRL reward function (called with the batch's completions and dataset columns)."""
    if kind == "arithmetic_exact":
        from rl.rewards import Sample, arithmetic_exact

        def arithmetic_exact_reward(prompts, completions, completion_ids, answer, **_) -> list[float]:
            # streamrl's own scorer on the same fields it sees in a streamrl run
            return [
                arithmetic_exact(Sample(prompt=p, response=c, response_ids=list(ids), row={"answer": a}))
                for p, c, ids, a in zip(prompts, completions, completion_ids, answer)
            ]

        return arithmetic_exact_reward
    if kind == "length":

        def length_reward(completion_ids, **_) -> list[float]:
            # trivially cheap: throughput runs measure the trainer, not the scorer
            return [len(ids) / max_new_tokens for ids in completion_ids]

        return length_reward
    raise ValueError(f"reward must be 'arithmetic_exact' or 'length', got {kind!r}")


def _step_recorder(cuda: bool):
    """A TrainerCallback recording each optimizer step's end time and the reward / length TRL logs for it."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.last = 0.0
            self.step_seconds: list[float] = []
            self.step_end_times: list[float] = []
            self.rewards: list[float] = []
            self.completion_len: list[float] = []
            self.logp_diff: list[float] = []  # vLLM vs trainer, per step: stays small iff weight syncs land

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                import torch

                torch.cuda.synchronize()  # the optimizer step is queued, not done, when this is called
            now = time.time()
            self.step_seconds.append(now - self.last)
            self.step_end_times.append(now)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            # logging_steps=1: one log per step, averaging exactly that step's generation batch
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))
                self.completion_len.append(float(logs["completions/mean_length"]))
            if logs and logs.get("sampling/sampling_logp_difference/mean") is not None:
                self.logp_diff.append(float(logs["sampling/sampling_logp_difference/mean"]))

    return StepRecorder()


@contextlib.contextmanager
def _vllm_patches(dtype: str, cpu: bool) -> Iterator[None]:
    """Two adjustments to TRL's colocated vLLM, undone on exit.

    dtype: TRL builds `vllm.LLM(...)` without one, so vLLM would take the checkpoint's (float32 for the tiny
    model, bfloat16 for most hub models) whatever the training precision; pass the run's.
    CPU only: TRL syncs weights with the model's `load_weights`, but vLLM's CPU backend repacks every linear
    weight after loading (oneDNN / packed GEMM) and leaves an empty `Parameter` without a `weight_loader`
    (AttributeError at the first sync). Use vLLM's layer-wise `reload_weights(weights_iterator=...)`
    instead, which restores the load-time layout, loads and repacks. CUDA keeps TRL's own path."""
    import trl.generation.vllm_generation as vg

    llm, sync = vg.LLM, vg.VLLMGeneration.sync_weights

    def cpu_sync_weights(self) -> None:
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker.reload_weights(weights_iterator=self._iter_named_params())
        self.llm.reset_prefix_cache()

    vg.LLM = functools.partial(llm, dtype=dtype)
    if cpu:
        vg.VLLMGeneration.sync_weights = cpu_sync_weights
    try:
        yield
    finally:
        vg.LLM, vg.VLLMGeneration.sync_weights = llm, sync


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(spec: dict) -> dict:
    """Train with TRL's GRPOTrainer as `spec` says; return timing and reward figures per optimizer step."""
    t_start = time.time()
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    import datasets
    import torch
    import transformers
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    progress = bool(spec.get("progress", False))
    if not progress:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))

    device, dtype = spec["device"], spec["dtype"]
    if device not in ("cpu", "cuda") or dtype not in ("float32", "bfloat16"):
        raise ValueError(f"device must be cpu|cuda and dtype float32|bfloat16, got {device!r}, {dtype!r}")
    groups, group_size = int(spec["batch_groups"]), int(spec["group_size"])
    micro = int(spec.get("micro_batch_size") or group_size)
    samples_per_step = groups * group_size
    if samples_per_step % micro:
        raise ValueError(f"batch_groups * group_size ({samples_per_step}) must be a multiple of micro_batch_size ({micro})")
    prompts = spec["prompts"]
    if len(prompts) < groups:  # TRL's sampler drops an incomplete batch of prompts: nothing would be left
        raise ValueError(f"need at least batch_groups={groups} prompts, got {len(prompts)}")
    max_new = int(spec["max_new_tokens"])
    use_vllm = bool(spec["use_vllm"])

    model_path = str(spec["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left", truncation_side="left")
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": str(r.get("answer", ""))} for r in prompts])

    vllm_args: dict[str, Any] = {}
    if use_vllm:
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM CPU's default takes a large slice of RAM
        max_model_len = spec.get("max_model_len") or max(len(tokenizer(r["prompt"]).input_ids) for r in prompts) + max_new
        vllm_args = dict(
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=float(spec.get("vllm_gpu_memory_utilization", 0.3)),
            vllm_enable_sleep_mode=False,
            vllm_max_model_length=int(max_model_len),
            vllm_tensor_parallel_size=1,
        )

    out_dir = tempfile.mkdtemp(prefix="trl-grpo-")
    args: dict[str, Any] = dict(
        output_dir=out_dir,
        # one optimizer step = grad_accum micro-batches = exactly one generation batch of groups * group_size
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=samples_per_step // micro,
        steps_per_generation=samples_per_step // micro,
        num_generations=group_size,
        num_iterations=1,
        max_steps=int(spec["steps"]),
        max_completion_length=max_new,
        temperature=float(spec.get("temperature", 1.0)),
        learning_rate=float(spec["lr"]),
        lr_scheduler_type="constant",  # streamrl's default schedule; TRL's default decays linearly to 0
        warmup_steps=0,  # spec["warmup_steps"] only excludes steps from timing
        epsilon=float(spec["clip_low"]),
        epsilon_high=float(spec["clip_high"]),
        beta=float(spec.get("beta", 0.0)),
        loss_type=spec.get("loss_type") or "dapo",
        gradient_checkpointing=bool(spec.get("gradient_checkpointing", False)),
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        model_init_kwargs={"dtype": spec.get("param_dtype", "float32")},
        use_vllm=use_vllm,
        seed=int(spec["seed"]),
        data_seed=int(spec["seed"]),
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    config = GRPOConfig(**{**args, **vllm_args, **dict(spec.get("extra_args") or {})})

    recorder = _step_recorder(cuda=device == "cuda")
    try:
        with _vllm_patches(dtype, cpu=device == "cpu") if use_vllm else contextlib.nullcontext():
            trainer = GRPOTrainer(
                model=model_path,
                reward_funcs=_reward_fn(spec["reward"], max_new),
                args=config,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[recorder],
            )
            if not progress:
                trainer.remove_callback(PrinterCallback)  # with tqdm off, it would print every step's logs
            start_time = time.time()
            trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    warm = int(spec.get("warmup_steps", 0))
    s_per_step = _median(recorder.step_seconds[warm:])
    mean_len = statistics.fmean(recorder.completion_len[warm:]) if recorder.completion_len[warm:] else float("nan")
    return {
        "system": "trl",
        "trl_version": trl.__version__,
        "steps": len(recorder.step_seconds),
        "step_seconds": recorder.step_seconds,
        "step_end_times": recorder.step_end_times,
        "start_time": start_time,
        "rewards": recorder.rewards,
        "completion_len": recorder.completion_len,
        "samples_per_step": samples_per_step,
        "s_per_step": s_per_step,
        "samples_per_s": samples_per_step / s_per_step,
        "tokens_per_s": mean_len * samples_per_step / s_per_step,
        "setup_seconds": start_time - t_start,
        "vllm_logp_diff": recorder.logp_diff,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m rl.bench.trl_grpo SPEC.json OUT.json`: run the spec, write the result, print one line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m rl.bench.trl_grpo SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run(spec)
    with open(argv[1], "w") as f:
        json.dump(result, f, indent=1)
    r = result["rewards"]
    print(f"trl {result['trl_version']}: {result['steps']} steps, {result['s_per_step']:.3f} s/step, "
          f"{result['samples_per_s']:.1f} samples/s, {result['tokens_per_s']:.1f} tokens/s, "
          f"reward {r[0] if r else float('nan'):.3f} -> {r[-1] if r else float('nan'):.3f}, "
          f"setup {result['setup_seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":  # vLLM may spawn processes that re-import the main module
    sys.exit(main())
