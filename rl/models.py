"""Models and tokenizers: local tiny models for CPU runs and tests, and loading of any HF model directory.

A tiny model is a real Hugging Face causal LM (Qwen2 or Llama architecture) with random init and a
character-level tokenizer defined here, saved as a normal HF directory that transformers and vLLM both
load. Users start RL from an instruct model, not from noise, so the tiny default model is warm-started by
a short supervised pass on the synthetic task; the result is cached under a key made of every setting
that shapes it, so the second run starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl.core.config import ModelConfig, TinyModelConfig
    from rl.data import SyntheticTask

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
#: printable ASCII: enough for arithmetic, countdown and small text tasks.
CHARS = [chr(c) for c in range(32, 127)]
BUILD_VERSION = 1  # bump when the builder's output changes for the same settings


def build_char_tokenizer(out_dir: str | Path) -> None:
    """Write a character-level fast tokenizer (one token per printable ASCII character) to `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD
    )
    fast.save_pretrained(str(out_dir))


def build_random_model(spec: TinyModelConfig, out_dir: str | Path) -> None:
    """Write a randomly initialised causal LM of the given shape, with the char tokenizer, to `out_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    build_char_tokenizer(out_dir)
    vocab_size = max(3 + len(CHARS), spec.vocab_size)  # a larger vocab gives real models' shapes
    model_type = {"qwen2": "qwen2", "llama": "llama"}[spec.arch]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out_dir))


def warm_start(model_dir: str | Path, task: SyntheticTask, spec: TinyModelConfig) -> dict[str, float]:
    """Supervised pass on the task's (prompt, answer) pairs, in place; returns the final loss and time.

    Stops after `spec.warm_start_steps` steps: the point is a model that sometimes answers right (mean
    reward around 0.1 to 0.5 when sampled), so RL has signal and room to improve.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # a GPU recipe's larger shape
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.warm_start_lr, weight_decay=0.0)
    rows = task.rows(spec.warm_start_steps * spec.warm_start_batch, seed=spec.seed + 1)
    noise_rng = random.Random(spec.seed + 2)
    for row in rows:  # an unsure teacher: some answers are near misses, so sampling is often wrong
        if noise_rng.random() < spec.warm_start_noise and row["answer"].lstrip("-").isdigit():
            row["answer"] = str(int(row["answer"]) + noise_rng.choice([-2, -1, 1, 2]))
    t0 = time.time()
    loss_value = float("nan")
    bar = tqdm(range(spec.warm_start_steps), desc="warm start (supervised)", leave=False)
    for step in bar:
        batch = rows[step * spec.warm_start_batch : (step + 1) * spec.warm_start_batch]
        input_ids, labels = (t.to(device) for t in _sft_batch(tok, batch))
        out = model(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long(), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = out.loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.cpu().save_pretrained(str(model_dir))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the driver keeps only its CUDA context; the engine and trainer need the rest
    return {"loss": loss_value, "seconds": time.time() - t0, "device": device.type}


def _sft_batch(tok, rows: list[dict]) -> tuple:
    """Right-padded input ids with labels on the answer tokens (and EOS) only."""
    import torch

    seqs, labels = [], []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
    return ids, lab


def tiny_model_key(spec: TinyModelConfig, task: SyntheticTask) -> str:
    """A short hash of every setting that shapes the built model, used as its cache directory name."""
    blob = json.dumps({"spec": asdict(spec), "task": task.describe(), "v": BUILD_VERSION}, sort_keys=True)
    return f"{spec.arch}-h{spec.hidden_size}-l{spec.num_layers}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def make_tiny_model(spec: TinyModelConfig, task: SyntheticTask, cache_dir: str | Path) -> Path:
    """Build (or reuse from the cache) the warm-started tiny model; returns its HF directory."""
    cache = Path(os.path.expanduser(str(cache_dir)))
    target = cache / tiny_model_key(spec, task)
    if (target / "config.json").exists() and (target / "streamrl_model.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        build_random_model(spec, work)
        stats = warm_start(work, task, spec) if spec.warm_start_steps > 0 else {}
        (work / "streamrl_model.json").write_text(
            json.dumps({"spec": asdict(spec), "task": task.describe(), "warm_start": stats}, indent=2)
        )
        try:
            work.rename(target)  # atomic: a concurrent builder either wins or finds it built
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def looks_like_path(value: str) -> bool:
    """Whether `model.path` names a local directory rather than a hub id: it starts with /, . or ~, has an OS
    separator other than '/', more than one '/', or exists here. A hub id is 'name' or 'org/name', so a
    path-looking value is never sent to the hub (a typo there fails late, with a hub error)."""
    seps = {os.sep, os.altsep} - {None, "/"}
    return (value.startswith(("/", ".", "~")) or any(s in value for s in seps) or value.count("/") > 1
            or Path(os.path.expanduser(value)).exists())


def check_model_path(path: str) -> str | None:
    """The problem with a local `model.path`, one line naming it and the fix; None when it is fine or a hub id."""
    if not looks_like_path(path):
        return None
    local = Path(os.path.expanduser(path))
    if not local.exists():
        return (f"Recipe key 'model.path' = {path!r}: no such directory ({local.resolve()}); give a local Hugging "
                "Face model directory, a hub id (org/name), or leave it empty for the tiny model")
    if not local.is_dir():
        return f"Recipe key 'model.path' = {path!r} is a file; give the model's directory (the one with config.json)"
    if not (local / "config.json").exists():
        return f"Recipe key 'model.path' = {path!r} is a directory without config.json: not a Hugging Face model"
    return None


def resolve_model_path(cfg: ModelConfig, task: SyntheticTask | None) -> str:
    """The HF directory (or hub id) the run uses: `cfg.path` if given, else the cached tiny model."""
    if cfg.path:
        problem = check_model_path(cfg.path)
        if problem:
            raise FileNotFoundError(problem)
        if looks_like_path(cfg.path):
            return str(Path(os.path.expanduser(cfg.path)).resolve())
        return cfg.path  # a hub id: transformers and vLLM fetch it when the machine has network
    if task is None:
        raise ValueError("model.path is empty and the data source is not synthetic: set model.path")
    return str(make_tiny_model(cfg.tiny, task, cfg.cache_dir))


def load_tokenizer(path: str):
    """The tokenizer of a local HF directory or hub id; pad defaults to EOS when a model has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32"):
    """A transformers causal LM from a local HF directory or hub id."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, dtype))
