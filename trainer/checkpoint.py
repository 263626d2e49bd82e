"""Distributed checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

A checkpoint is a directory `<run_dir>/checkpoints/step_<N>` (N = policy version = steps done) holding:
- DCP shards of the policy (float32 master weights), AdamW state, LR scheduler, the version, and the
  critic and its optimizer when there is one. DCP stores every tensor with its global shape, so a run
  resumes on any number of trainer ranks (the load reshards).
- `rng/rank_<r>.pt`: each rank's RNG states (torch, CUDA, Python, NumPy) as tensors, numbers and lists only.
  Restored when the rank exists in the resumed run; a run resumed on a different number of ranks starts
  those ranks' streams afresh.
- `.metadata`, written by DCP last, once every rank's shards are on disk: a directory without it is an
  interrupted save and `latest_checkpoint` skips it.

Saving is asynchronous (`dcp.async_save`): the state is copied to host memory before the call returns,
then written by a background thread while training goes on. The writes' own collectives run on a
separate gloo group so they never interleave with the training collectives.

Nothing in a checkpoint runs on load: a run directory may come from anyone. The RNG files load with
`torch.load(weights_only=True)`, DCP's `.metadata` (a pickle) with an unpickler that builds only DCP's own
metadata types, and DCP's non-tensor items (scheduler state, version) are checked by the weights-only
unpickler before DCP reads them. Anything else is refused (`UnsafeCheckpoint`, naming the file).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import random
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP = re.compile(r"^step_(\d+)$")


def step_dir(run_dir: str | Path, version: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{version}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under a run directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / ".metadata").exists()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0: delete none)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- state

def _state(trainer: Any) -> dict[str, Any]:
    """The state dict DCP saves and loads in place; `trainer` is a trainer.engine.PolicyTrainer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(trainer.model, trainer.optim)
    state: dict[str, Any] = {"model": model, "optim": optim, "sched": trainer.sched.state_dict(),
                             "meta": {"version": trainer.version}}
    if trainer.critic is not None:
        critic, critic_optim = get_state_dict(trainer.critic, trainer.critic_optim)
        state.update(critic=critic, critic_optim=critic_optim, critic_sched=trainer.critic_sched.state_dict())
    return state


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, numbers, strings and lists: what `torch.load(weights_only=True)` reads."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- loading without running code

class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something other than saved state (a pickle that would build or call code)."""


def _refuse(path: Any, exc: BaseException) -> UnsafeCheckpoint:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]  # torch's message is a page: keep its cause
    why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(exc).__name__)
    return UnsafeCheckpoint(f"{path} holds more than saved state, so it was not loaded ({why}). streamrl writes "
                            "only tensors, numbers and lists there: the file was altered or not written by "
                            "streamrl; resume from a checkpoint you trust (delete this one)")


def _load_tensors(path: Path) -> Any:
    """`torch.load` of a file streamrl wrote, refusing any pickle that would import or call code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refuse(path, exc) from None


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata` pickle, building only DCP's metadata dataclasses and enums, torch sizes,
    dtypes and layouts, and paths; any other global (os.system, eval, ...) is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in self.MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:  # a class of DCP's own, not an import
                return found
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _dcp_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            meta_file = path / (".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(meta_file, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except pickle.UnpicklingError as exc:
                raise _refuse(meta_file, exc) from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _dcp_planner(path: Path) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            # DCP unpickles non-tensor items with weights_only=False: the weights-only unpickler reads the
            # same bytes first, so DCP's own load below meets only globals it allowed
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise _refuse(f"{path} (item {read_item.dest_index.fqn})", exc) from None
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner()


def verify(path: str | Path) -> None:
    """Check a checkpoint's pickled files before anything starts (`streamrl resume`): DCP's metadata and
    every rank's RNG state. Raises `UnsafeCheckpoint` naming the file; loads no state."""
    path = Path(path)
    _dcp_reader(path).read_metadata()
    for rng in sorted((path / "rng").glob("rank_*.pt")):
        _load_tensors(rng)


def save(trainer: Any, path: str | Path, group: Any, use_async: bool = True) -> Optional[Future]:
    """Start writing a checkpoint of `trainer` (a collective: every rank calls). Returns the future of the
    background write (None when `use_async` is false and the write is done)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    (path / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(_rng_state(), path / "rng" / f"rank_{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        (path / "trainer.json").write_text(json.dumps({"version": trainer.version, "world_size": dist.get_world_size()}))
    state = _state(trainer)
    if use_async:
        return dcp.async_save(state, checkpoint_id=str(path), process_group=group)
    dcp.save(state, checkpoint_id=str(path), process_group=group)
    return None


def load(trainer: Any, path: str | Path, group: Any) -> int:
    """Restore `trainer` in place from a checkpoint saved with any number of ranks; returns its version."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a complete distributed checkpoint (no .metadata)")
    verify(path)  # a clear refusal before DCP, which would wrap it in its own error
    state = _state(trainer)
    dcp.load(state, storage_reader=_dcp_reader(path), planner=_dcp_planner(path), process_group=group)
    set_state_dict(trainer.model, trainer.optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer.sched.load_state_dict(state["sched"])
    if trainer.critic is not None:
        set_state_dict(trainer.critic, trainer.critic_optim, model_state_dict=state["critic"],
                       optim_state_dict=state["critic_optim"])
        trainer.critic_sched.load_state_dict(state["critic_sched"])
    trainer.version = int(state["meta"]["version"])
    rng = path / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng.exists():
        _set_rng_state(_load_tensors(rng))
    else:
        log.info("checkpoint %s has no RNG state for rank %d (saved with fewer ranks): fresh streams", path,
                 dist.get_rank())
    return trainer.version


# ---------------------------------------------------------------- Hugging Face export

_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.index\.json$")
_SKIP_FILES = {"config.json", "streamrl_model.json"}
SHARD_BYTES = 4 << 30


def export_hf(model: torch.nn.Module, source: Any, out_dir: str | Path, dtype: torch.dtype,
              merged: bool = False) -> Optional[Path]:
    """Write the policy as a normal HF model directory (config, tokenizer, safetensors) on rank 0; every
    rank calls (the full weights are gathered from the shards). Returns the directory on rank 0.

    A LoRA policy (trainer/lora.py) is written as a PEFT adapter (adapter_config.json and
    adapter_model.safetensors, with the tokenizer) that `PeftModel.from_pretrained` puts on the base model,
    and with `merged` also as the merged model in `<out_dir>/merged`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from trainer import lora

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not lora.has_lora(model):
        _write_model(model, dict(full), source, out, dtype)
        return out
    from safetensors.torch import save_file

    cfg = lora.peft_config(model.streamrl_lora, source if isinstance(source, str) else None)
    cfg.save_pretrained(str(out))
    save_file({k: v.to(dtype).contiguous() for k, v in lora.adapter_state(full).items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(source, out)
    if merged:
        (out / "merged").mkdir(exist_ok=True)
        _write_model(model, dict(lora.merged_state(model, full)), source, out / "merged", dtype)
    return out


def _write_model(model: torch.nn.Module, full: dict[str, torch.Tensor], source: Any, out: Path,
                 dtype: torch.dtype) -> None:
    config = model.config
    tensors = {k: v.to(dtype).contiguous() for k, v in full.items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied to the input embedding; safetensors refuses shared storage
    _write_safetensors(tensors, out)
    _copy_tokenizer(source, out)
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))


def _write_safetensors(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """One model.safetensors, or shards of at most SHARD_BYTES with the usual index file."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _copy_tokenizer(source: Any, out: Path) -> None:
    """Tokenizer (and other non-weight files) of the source model directory, or of a hub id."""
    if isinstance(source, str) and Path(source).is_dir():
        for f in Path(source).iterdir():
            if f.is_file() and f.name not in _SKIP_FILES and not _WEIGHT_FILES.match(f.name):
                shutil.copy2(f, out / f.name)
        return
    if isinstance(source, str):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source).save_pretrained(str(out))
