"""TrainerWorker: one Ray actor per rank of a torch.distributed group, training the policy with FSDP2.

A step: rank 0 claims the next batch of whole groups from the data store (metadata only) and broadcasts
the claim; every rank fetches its own groups' payload straight from the storage units and hands the samples
to its PolicyTrainer (trainer/engine.py: micro-batches, advantages, losses, optimizer, all looked up by
name in `rl.core.algorithms`). When the controller asks (every `trainer.checkpoint_every` versions), the ranks
start an asynchronous distributed checkpoint (trainer/checkpoint.py) and train on while it is written.
Then the full weights are gathered from the shards and sent to the rollout engines through the weight
channel.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray
import torch
import torch.distributed as dist

from datastore.client import DataStore
from datastore.controller import Take
from rl.core.config import Recipe, trainer_memory_fraction
from rl.core.heap import settle
from rl.core.staleness import oldest_trainable, trainable
from rl.core.transport import ChannelSpec, WeightHandle
from rl.core.waits import WaitTimeout
from trainer import checkpoint
from trainer.batching import samples_from_columns
from trainer.engine import PolicyTrainer
from trainer.model import param_count

log = logging.getLogger(__name__)

TRAIN_FIELDS = ["prompt_ids", "response_ids", "logprobs", "loss_mask", "reward", "version", "group"]
CONSUMER = "trainer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class StepResult:
    """A train step's answer to the controller: the global metrics, and (rank 0) the rows it trained on
    and the rows it dropped as too stale, which the controller records for a resume."""

    metrics: dict[str, Any]
    trained: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    yielded: bool = False  # the step gave way before claiming a batch (`ask_yield`); call it again


CLAIM_SLICE_S = 1.0  # rank 0 waits for the batch in slices this long, looking for a request to give way


class TrainerWorker:
    def __init__(self, rank: int, recipe: Recipe, model_path: str, store: DataStore, partition: str,
                 device: str = "cpu", run_dir: Optional[str] = None) -> None:
        self.rank, self.recipe, self.model_path, self.store, self.partition = rank, recipe, model_path, store, partition
        self.world_size = recipe.trainer.world_size
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.backend = "nccl" if device == "cuda" else "gloo"
        self.run_dir = run_dir  # None: no checkpoints
        self.version = 0
        self.model: Any = None
        self.engine: Optional[PolicyTrainer] = None
        self.sender: Any = None  # trainer.weights.WeightSender, made by open_weight_channel
        self.ckpt_group: Any = None
        self.pending: Optional[tuple[Path, concurrent.futures.Future]] = None  # checkpoint being written
        self.yield_asked = threading.Event()
        torch.set_num_threads(recipe.trainer.threads_per_rank)

    @ray.method(concurrency_group="watch")
    def ask_yield(self) -> None:
        """Answered beside a running step: if the step is still waiting for its batch, it returns without
        training (`StepResult.yielded`) so the controller can sync weights first. Why: an engine restarted
        mid-run gets work only once it holds the current weights, and with no other engine the batch the
        step waits for can come only from it."""
        self.yield_asked.set()

    @ray.method(concurrency_group="watch")
    def where(self) -> str:
        """The Python stack of the thread running its steps (innermost last), answered on a thread of its
        own while a step runs: what the watchdog (rl/watchdog.py) shows of a stuck rank."""
        import sys
        import traceback

        frame = sys._current_frames().get(getattr(self, "step_thread", None) or threading.main_thread().ident)
        return "".join(traceback.format_stack(frame)[-8:]) if frame is not None else "(no step has run yet)"

    # ------------------------------------------------------------------ setup
    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        """Join the process group, load the model, shard it with FSDP2, build the optimizer."""
        t0 = time.perf_counter()
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        timeout = datetime.timedelta(seconds=self.recipe.resources.wait_timeout_s)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if self.recipe.resources.placement == "share":  # the engine holds the rest of this GPU
                torch.cuda.set_per_process_memory_fraction(trainer_memory_fraction(self.recipe), self.device)
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size, timeout=timeout)
        # checkpoint writes run their collectives in a background thread: a group of their own
        self.ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        self.engine = PolicyTrainer(self.recipe, self.model_path, self.device)
        self.model = self.engine.model
        settle()  # a full collection mid-step walks only what the run made (rl/core/heap.py)
        return {"rank": self.rank, "params": param_count(self.model), "setup_seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ step
    def _claim(self, step: int) -> tuple[Optional[Take], list[int]]:
        """Rank 0 drops groups past the staleness bound, then claims B whole groups of version >=
        oldest_trainable(step) from the store; every rank learns the claim. Returns it (None when the
        controller asked the step to give way before a batch came: `ask_yield`) and the rows dropped."""
        n = self.recipe.rollout.group_size
        box: list[Any] = [None]
        if self.rank == 0:
            floor = oldest_trainable(step, self.recipe.algorithm.eta)
            dropped = self.store.discard(CONSUMER, self.partition, {"version": ("<", floor)}, group_size=n)
            fields = TRAIN_FIELDS + (["accepted"] if self.recipe.algorithm.dynamic_sampling else [])
            take, deadline = None, time.monotonic() + self.recipe.resources.wait_timeout_s
            self.yield_asked.clear()  # a request made while the last step computed is stale (it is asked again)
            while take is None and time.monotonic() < deadline and not self.yield_asked.is_set():
                take = self.store.take(CONSUMER, self.partition, fields, self.recipe.trainer.batch_groups * n,
                                       group_size=n, where={"version": (">=", floor)},
                                       timeout=max(0.01, min(CLAIM_SLICE_S, deadline - time.monotonic())))
            if take is None and self.yield_asked.is_set():
                box[0] = (None, dropped)
            else:
                box[0] = (take, dropped) if take is not None else RuntimeError(
                f"Timed out after {self.recipe.resources.wait_timeout_s:.0f} s waiting for "
                f"{self.recipe.trainer.batch_groups} complete groups (fields {TRAIN_FIELDS}, version >= {floor}) "
                f"from the data store for step {step}: are the rollout and reward workers alive? see their logs")
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def _my_share(self, take: Take) -> Take:
        """Whole groups for this rank: groups are dealt round-robin so every rank gets as many."""
        n = self.recipe.rollout.group_size
        groups = sorted({i // n for i in take.indexes})
        mine = set(groups[self.rank :: self.world_size])
        keep = [k for k, i in enumerate(take.indexes) if i // n in mine]
        return Take([take.indexes[k] for k in keep], [take.units[k] for k in keep])

    def train_step(self, step: int) -> StepResult:
        """One optimizer step (or `trainer.mini_batches` of them) on the next batch; every rank must call
        it. Returns global metrics and, on rank 0, the rows trained and dropped. (Checkpoints are the
        controller's call: it saves only after it has recorded what the step trained on, so a checkpoint
        never holds a step the records lack.)"""
        self.step_thread = threading.get_ident()  # where() shows this thread's stack
        assert self.engine is not None, "setup() first"
        t0 = time.perf_counter()
        take, dropped = self._claim(step)
        if take is None:  # gave way: the controller records the rows dropped and calls again
            return StepResult({}, dropped=list(dropped) if self.rank == 0 else [], yielded=True)
        t_wait = time.perf_counter() - t0
        share = self._my_share(take)
        columns = self.store.fetch(self.partition, share, TRAIN_FIELDS).to_pydict()
        _check_trainable(columns["version"], share.indexes, step, self.recipe.algorithm.eta)
        m = self.engine.train(samples_from_columns(columns), step)
        self.version = self.engine.version
        m["time/wait_batch_s"] = t_wait
        m["staleness/dropped_groups"] = len(dropped) // self.recipe.rollout.group_size
        result = StepResult(m)
        if self.rank == 0:  # the controller records which rows each step trained on (resume needs it)
            result.trained, result.dropped = list(take.indexes), list(dropped)
            versions = columns["version"] if self.world_size == 1 else \
                self.store.fetch(self.partition, take, ["version"]).column("version").to_pylist()
            m["staleness/hist"] = {str(k): v for k, v in sorted(Counter(step - x for x in versions).items())}
        m["time/step_s"] = time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Optional[str] = None, wait: bool = True) -> str:
        """Start a distributed checkpoint (a collective) at `path` (default <run_dir>/checkpoints/step_<version>).
        The previous one is finished first; with `wait` this one is too. Returns the path."""
        assert self.engine is not None, "setup() first"
        self.wait_checkpoint()
        if path is None:
            if not self.run_dir:
                raise ValueError("save_checkpoint needs a path: this trainer has no run_dir")
            path = str(checkpoint.step_dir(self.run_dir, self.version))
        future = checkpoint.save(self.engine, path, self.ckpt_group, use_async=True)
        assert future is not None
        self.pending = (Path(path), future)
        if wait:
            self.wait_checkpoint()
        return path

    def wait_checkpoint(self) -> Optional[str]:
        """Block until the checkpoint being written (if any) is on disk; prune old ones. Returns its path."""
        if self.pending is None:
            return None
        path, future = self.pending
        self.pending = None
        timeout = self.recipe.resources.wait_timeout_s
        try:
            future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise WaitTimeout(f"Timed out after {timeout:.0f} s waiting for trainer rank {self.rank} to write its "
                              f"shards of the checkpoint {path}") from None
        except Exception as exc:
            raise RuntimeError(f"trainer rank {self.rank} failed to write the checkpoint {path}: {exc}") from exc
        if self.rank == 0 and self.run_dir:
            checkpoint.prune(self.run_dir, self.recipe.trainer.keep_checkpoints)
        return str(path)

    def load_checkpoint(self, path: str) -> int:
        """Restore model, optimizer, scheduler, RNG and version (a collective); returns the version."""
        assert self.engine is not None, "setup() first"
        self.wait_checkpoint()
        self.version = checkpoint.load(self.engine, path, self.ckpt_group)
        return self.version

    def export_hf(self, out_dir: str) -> Optional[str]:
        """Write the policy as a Hugging Face directory in `model.dtype` (a collective; rank 0 writes); with
        LoRA the adapter in PEFT's format (and the merged model in merged/ if `trainer.export_merged`)."""
        assert self.engine is not None, "setup() first"
        out = checkpoint.export_hf(self.model, self.model_path, out_dir, getattr(torch, self.recipe.model.dtype),
                                   merged=self.recipe.trainer.export_merged)
        dist.barrier()
        return None if out is None else str(out)

    def full_params(self) -> dict[str, Any]:
        """Every full parameter as a float32 NumPy array on rank 0 (empty elsewhere); a collective, for tests."""
        out = {}
        for name, p in self.model.named_parameters():
            full = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            if self.rank == 0:
                out[name] = full.float().cpu().numpy()
        return out

    # ------------------------------------------------------------------ weights
    def open_weight_channel(self, kind: str, num_receivers: int) -> ChannelSpec:
        """Every rank: build the weight sender for `kind` (see trainer/weights.py); rank 0 opens the
        rendezvous the engine workers join. Returns the spec (rank 0's is the one to hand out)."""
        from trainer.weights import WeightSender

        assert self.model is not None, "setup() first"
        if self.sender is not None:
            self.sender.close()
        r = self.recipe
        self.sender = WeightSender(self.model, self.rank, self.device, getattr(torch, r.model.dtype), kind,
                                   int(r.rollout.weight_bucket_mb * 2**20), r.resources.wait_timeout_s)
        return self.sender.open(num_receivers, ray.util.get_node_ip_address())

    def connect_weight_channel(self) -> dict[str, Any]:
        """Rank 0 joins the group with every engine worker (they join at the same time); no-op elsewhere."""
        assert self.sender is not None, "open_weight_channel() first"
        return self.sender.connect()

    def send_weights(self, probe: bool = False) -> WeightHandle | None:
        """Gather full tensors from the shards (a collective: every rank calls), cast them to the engine
        dtype and send them bucket by bucket. Returns the handle on rank 0, None elsewhere."""
        assert self.sender is not None, "open_weight_channel() first"
        handle = self.sender.send(self.version, probe=probe)
        return handle if self.rank == 0 else None

    def release_weights(self, handle: WeightHandle) -> None:
        if self.sender is not None:
            self.sender.release(handle)

    def sequence_logprobs(self, token_ids: list[int]) -> list[float | None]:
        """The trainer's logprob of each token given those before it (None for the first); a collective."""
        assert self.engine is not None, "setup() first"
        return self.engine.sequence_logprobs(token_ids)

    def shutdown(self) -> None:
        try:
            self.wait_checkpoint()
        except Exception as exc:  # a failed write must not keep the process group alive
            log.error("%s", exc)
        if self.sender is not None:
            self.sender.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_trainable(versions: list[int], indexes: list[int], step: int, eta: int) -> None:
    """The consumption side of the whole staleness rule, on each rank's share before it trains: the claim's
    filter bounds versions from below only, and a version newer than the step means samples of a lineage
    lost with a crash reached the trainer (a resume drops them first: rl/resume.py)."""
    bad = {i: v for i, v in zip(indexes, versions) if not trainable(v, step, eta)}
    if bad:
        raise RuntimeError(f"step {step} was given samples outside the staleness rule (versions {step - eta}..{step}): "
                           f"rows {dict(list(bad.items())[:8])} (row: version). Versions above {step} come from "
                           f"a run that crashed after this run's checkpoint; resume with `streamrl resume RUN_DIR`, "
                           f"which drops them, or start a fresh run directory")


# no task events: Ray's GCS would keep one per call of this actor's methods, all run long (issue 19)
TrainerActor = ray.remote(num_cpus=1, concurrency_groups={"watch": 1}, enable_task_events=False)(TrainerWorker)
