"""The recipe schema: typed dataclasses, loaded and merged with OmegaConf, validated before any actor starts.

Every key is declared here with its default and a comment saying what it does; code reads typed attributes
(`recipe.rollout.temperature`), never string keys with silent defaults. `load_recipe` rejects an unknown key
by name, with the closest valid key and the valid keys of its section; a YAML syntax error with the file, line
and column; a value of the wrong type with the key, the type it takes and the value given (one line each).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(ValueError):
    """A recipe or override that cannot run; the message names the key and what would be valid."""


@dataclass
class TinyModelConfig:
    """Shape and warm start of the locally built model used when `model.path` is empty."""

    arch: str = "llama"  # llama | qwen2 (transformers 5 swaps in its own Qwen2Tokenizer for qwen2, which drops spaces of the char tokenizer)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    vocab_size: int = 0  # 0: the char tokenizer's 98; larger pads the embedding to a real model's shape
    seed: int = 0
    warm_start_steps: int = 800  # supervised steps on the synthetic task; 0 leaves random weights
    warm_start_batch: int = 64
    warm_start_lr: float = 3e-3
    warm_start_noise: float = 0.6  # share of warm-start answers replaced by a near miss (answer +-1 or 2)


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT's LoRA): train only them, sync only what they change (docs/weights.md)."""

    rank: int = 0  # 0 = off: full fine-tuning
    alpha: float = 16.0  # scale of the adapter's update: alpha / rank
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # linear layers (name ends)
    dropout: float = 0.0  # on the adapter's input, in training only


@dataclass
class ModelConfig:
    path: Optional[str] = None  # local HF directory or hub id; empty builds the tiny model below
    dtype: str = "float32"  # float32 | bfloat16: parameter dtype for training and generation
    cache_dir: str = "~/.cache/streamrl/models"  # where built tiny models are cached, keyed by settings
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ArithmeticConfig:
    """The synthetic task `a op b =` with ground truth; reward is exact match of the answer."""

    min_value: int = 0
    max_value: int = 19
    ops: str = "+"  # any of + - *


@dataclass
class DataConfig:
    source: str = "synthetic:arithmetic"  # synthetic:NAME, or a local .parquet / .jsonl file of prompts
    prompt_key: str = "prompt"  # column holding the prompt text in a file source
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    shuffle: bool = True  # shuffle a file source every epoch
    template: str = ""  # Python format string over the row's fields making the prompt, e.g.
    #                     "Question: {question}\nAnswer:"; empty uses the prompt column as is
    chat_template: bool = False  # wrap the prompt as one user message with the tokenizer's chat template


@dataclass
class AgentConfig:
    """Multi-turn rollouts: after each model turn, `fn(conversation)` returns the next tool/user turn's text
    (appended to the context, masked out of the loss) or None to end the episode."""

    fn: Optional[str] = None  # module:function or path/to/file.py:function; empty = single-turn
    max_turns: int = 4  # model turns per episode
    max_total_tokens: int = 0  # response tokens over all turns (model + tool); 0 = rollout.max_tokens * max_turns
    timeout_s: float = 30.0  # per call of fn; past it the episode ends there


@dataclass
class RolloutConfig:
    num_engines: int = 1  # rollout workers, each owning one vLLM engine
    tensor_parallel_size: int = 1
    group_size: int = 8  # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_tokens: int = 8  # new tokens per sample
    stop: list[str] = field(default_factory=list)
    max_num_seqs: int = 256  # vLLM's cap on sequences decoded together
    max_model_len: int = 64
    kv_cache_gib: float = 0.25  # VLLM_CPU_KVCACHE_SPACE on CPU; ignored on GPU
    cpu_threads: int = 1  # OpenMP threads of each engine on CPU (beside a trainer, more threads only spin); GPU: ignored
    gpu_memory_utilization: float = 0.5  # share of each GPU the engine holds (weights, KV cache, graphs); with
    #                                      resources.placement=share the trainer rank has trainer.gpu_memory_fraction beside it
    enforce_eager: bool = True  # skip graph capture / compilation: faster start, right for tiny models
    weight_transport: str = "auto"  # how weights reach the engines (docs/weights.md): auto | shm | gloo | nccl | ipc;
    #                                 auto = gloo on CPU, nccl on GPUs, ipc when trainer and engines share GPUs
    weight_bucket_mb: float = 256.0  # weights travel in buckets of at most this many MiB (a bigger tensor goes alone)
    update_mode: str = "interrupt"  # interrupt: in-flight requests are cut between engine steps and continue on the
    #                                 new weights, reusing the KV cache they have (computed by older weights, as
    #                                 prefix-cache hits may be); recompute: the same, but every cached KV is dropped
    #                                 and in-flight requests re-prefill on the new weights (AReaL's rule); drain:
    #                                 in-flight requests finish on the old weights, then the caches are dropped and it loads
    ignore_eos: bool = False  # generate max_tokens every time (benchmarks)
    seed_requests: bool = False  # a seed per request (reproducible samples; vLLM samples them one by one: slower on GPU)
    detokenize: bool = True  # the response text (rewards read it): decoded once per turn, or by the engine token
    #                          by token when `stop` strings are set (they need it); false: token ids only
    sleep_level: int = 1  # resources.placement=timeshare: 1 drops the KV cache and offloads weights, 2 drops weights too
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass
class TrainerConfig:
    world_size: int = 1  # FSDP2 ranks, one Ray actor each
    total_steps: int = 300  # optimizer steps (= policy versions) in the run
    batch_groups: int = 16  # prompt groups per step; each has rollout.group_size samples
    lr: float = 5e-4  # AdamW; the tiny CPU default model learns at 5e-4 and is unstable at 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    threads_per_rank: int = 1  # torch intra-op threads for each rank on CPU
    compute_dtype: str = "auto"  # FSDP2 param/compute dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 |
    #                              bfloat16; master weights and AdamW state are float32 whatever this is
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter across ranks
    activation_checkpointing: bool = False  # recompute decoder layers in backward: less memory, ~1/3 more compute
    micro_batch_tokens: int = 0  # token budget per micro-batch (rows x padded length; packed length with packing);
    #                              0 = no budget. Samples are binned by length so a micro-batch pads little
    micro_batch_size: int = 0  # most samples per micro-batch; 0 = no cap (no cap and no budget: one micro-batch)
    packing: bool = False  # a micro-batch is one row of concatenated samples (attention stays within each sample)
    gpu_memory_fraction: float = 0.0  # resources.placement=share: the most of its GPU a trainer rank may allocate
    #                                   (enforced by torch); 0 = what the engine leaves: 0.95 - rollout.gpu_memory_utilization
    pad_multiple: int = 0  # a micro-batch's sequence length is rounded up to a multiple of this, so shapes repeat
    #                        across steps and per-shape plans (cuDNN attention) are built once; 0 = auto: 64 on
    #                        CUDA (a new shape cost ~2 ms of host time per attention call there), 1 on CPU
    mini_batches: int = 1  # optimizer updates per step (PPO mini-batches); > 1 recomputes proximal logprobs first
    lr_schedule: str = "constant"  # constant | cosine (from lr to min_lr_ratio * lr at total_steps)
    warmup_steps: int = 0  # linear warmup of the learning rate over this many steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    critic_lr: float = 1e-3  # AdamW learning rate of the critic (algorithm.advantage = gae)
    export_final: bool = True  # write the final model as a Hugging Face directory to <run_dir>/final_model
    export_merged: bool = False  # with model.lora: also write the merged model to <run_dir>/final_model/merged
    checkpoint_every: int = 0  # steps between distributed checkpoints in <run_dir>/checkpoints/step_<N>; 0 = none
    keep_checkpoints: int = 0  # newest checkpoints kept on disk; 0 keeps every one


@dataclass
class AlgorithmConfig:
    eta: int = 1  # staleness bound: a sample made by version v is trained at version <= v + eta
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, draw more prompts
    dynamic_sampling_max_drops: int = 0  # give up after this many signal-free groups in a row; 0 = 20 batches
    advantage: str = "grpo"  # advantage estimator, see rl.core.algorithms.ADVANTAGES; with rollout.group_size = 1 the
    #                          group estimators (grpo, rloo, reinforce_pp_baseline) use the raw reward (no baseline)
    std_normalize: bool = True  # grpo, rloo: divide by the group's reward std
    policy_loss: str = "decoupled_ppo"  # decoupled_ppo | ppo_clip | gspo (needs loss_agg seq-mean); rl.core.algorithms.POLICY_LOSSES
    clip_low: float = 0.2
    clip_high: float = 0.28  # clip-higher (DAPO); set equal to clip_low for symmetric PPO (gspo: about 3e-4 and 4e-4)
    clip_ratio_c: float = 3.0  # dual clip (decoupled_ppo, ppo_clip): a token with advantage A < 0 loses at most -c * A;
    #                            > 1, or 0 to turn it off
    behaviour_weight_cap: float = 2.0  # cap of the proximal/behaviour importance weight
    behaviour_cap_mode: str = "clamp"  # clamp: a weight above the cap becomes the cap; mask (AReaL): its token's
    #                                    policy-gradient term is dropped (it still counts in the denominator)
    loss_agg: str = "token-mean"  # token-mean | seq-mean (each sample's token mean, then the mean over samples) |
    #                               seq-mean-token-sum (token sums, mean over samples) | seq-mean-token-sum-norm
    #                               (Dr. GRPO: token sums / the longest response allowed, mean over samples)
    kl_coef: float = 0.0  # KL(pi || kl_reference) as a loss term (0 disables)
    kl_estimator: str = "k3"  # k1 | k2 | k3, for both kl_coef and kl_reward_coef
    kl_reward_coef: float = 0.0  # KL as reward shaping: -coef * KL(pi || kl_reference) added to each token's reward
    kl_reference: str = "behaviour"  # behaviour: the rollout policy; initial: a frozen copy of the starting model
    entropy_coef: float = 0.0  # entropy bonus: the loss subtracts coef * per-token entropy
    gamma: float = 1.0  # discount of token rewards (reinforce_pp, reinforce_pp_baseline, gae)
    gae_lambda: float = 1.0  # GAE lambda
    gae_whiten: bool = True  # gae: normalise advantages to mean 0, std 1 over the global batch
    value_clip: float = 0.2  # gae critic: clip of the value loss around the pre-update values (0 disables)


@dataclass
class RewardConfig:
    fn: str = "rl.rewards:arithmetic_exact"  # module:function or path/to/file.py:function
    num_workers: int = 1  # reward actors (none when inline)
    inline: bool = False  # score each sample in its rollout worker as it finishes and store it with its reward: no
    #                       reward actors, no store round trip (for cheap functions; a slow or CPU-heavy one
    #                       belongs in reward workers, where it cannot slow generation)
    timeout_s: float = 10.0  # per call; a call past it is reported and scored error_score
    isolation: str = "thread"  # where a synchronous function runs: thread (a pool of 8; a call past its timeout
    #                            keeps its thread) | process (reward.processes processes; a call past its timeout
    #                            has its process killed and replaced; the function must be importable there)
    processes: int = 4  # isolation=process: worker processes per scorer (reward worker, or rollout worker inline)
    error_score: float = 0.0  # score given when the function raises, times out or returns garbage
    batched: bool = False  # the function takes a list of samples and returns a list of scores
    model_path: Optional[str] = None  # for rl.rewards:RewardModel: a sequence-classification model directory
    model_sigmoid: bool = False  # RewardModel: squash the logit into (0, 1)
    answer_mode: str = "strict"  # rl.rewards:MathAnswer: strict (only a '#### <number>' or \boxed{} answer counts) |
    #                              flexible (also '####72', '#### $72.', and the last number of an unmarked response)


@dataclass
class DataStoreConfig:
    """The streaming data store (docs/datastore.md): sharding, capacity, eviction, the durable log."""

    num_storage_units: int = 1  # payload actors; rows are sharded across them by index
    capacity_rows: int = 65536  # most rows held in memory (split evenly over the units); a put of new rows waits for room; 0: unbounded
    capacity_bytes: int = 4 * 2**30  # most payload bytes held (split evenly over the units); 0: unbounded
    required_consumers: list[str] = field(default_factory=lambda: ["reward", "trainer"])  # a row taken or discarded by all of these (and finished) is dropped from memory; empty: keep every row
    finished_fields: list[str] = field(default_factory=list)  # fields a row needs to be finished (logged, evictable); empty: every declared field
    log: bool = True  # append finished rows and consumption records to <run_dir>/datastore: the rollout dump, and what a restart recovers from
    log_fsync: bool = False  # fsync every log append: survives a machine crash, not only a process crash; slower
    durable_consumers: list[str] = field(default_factory=list)  # consumers whose takes are logged so a restart never repeats a row to them; empty: the required consumers
    lease_s: float = 600.0  # rows a consumer took stay in memory until it takes again or releases, or this many seconds pass
    stats_window_s: float = 30.0  # window of the "recent" put/get rates in stats()


@dataclass
class ResourcesConfig:
    device: str = "auto"  # auto | cpu | cuda
    placement: str = "separate"  # where engines and trainer ranks run (docs/design.md, "Placement"):
    #   separate: engines and trainer ranks on GPUs of their own (any eta);
    #   timeshare: each GPU holds a trainer rank and an engine (or a TP shard of one) that take turns: the engine
    #              sleeps while the trainer steps (algorithm.eta = 0 only; rollout.sleep_level);
    #   share: each GPU holds a trainer rank and an engine (or a TP shard of one) at once, its memory split by
    #          rollout.gpu_memory_utilization and trainer.gpu_memory_fraction (any eta: async on one GPU)
    ray_address: Optional[str] = None  # empty starts a local Ray; "auto" joins a running cluster
    num_cpus: Optional[int] = None  # logical CPUs for a local Ray (default: enough for every actor)
    ray_host: str = "127.0.0.1"  # where a Ray that streamrl starts listens (its ports and dashboard): loopback
    #   keeps it to this machine; this machine's IP (or 0.0.0.0: Ray's own default) lets other nodes join
    wait_timeout_s: float = 300.0  # every blocking wait (actor calls, store gets, syncs) gives up after this
    stall_warn_s: float = 60.0  # a step that makes no progress this long: log which actor is stuck and where (0: off)
    max_restarts: int = 3  # recoveries inside the run: a dead rollout worker is replaced (this many times per engine),
    #                        and after a dead trainer rank or storage unit the run goes on from its last checkpoint
    #                        (this many times per run; needs trainer.checkpoint_every); 0: a fault ends the run


@dataclass
class LoggingConfig:
    run_dir: str = ""  # empty: runs/<date>-<time>-<name>
    cluster_run_root: str = "~/streamrl-runs"  # `streamrl submit`: where a job's run directory goes on the node that
    #                                            runs the job's driver (the head node; ~ is the home of the user Ray
    #                                            runs as there): <this>/<date>-<time>-<name>, or <this>/<run_dir> for
    #                                            a relative logging.run_dir; a shared file system path works too
    name: str = "run"
    progress: bool = True  # a progress bar on the console
    jsonl: bool = True  # metrics.jsonl in the run directory; the dashboard's charts read it (false leaves them empty)
    dashboard: bool = True  # serve the live dashboard (docs/dashboard.md) from the driver while the run goes on
    dashboard_host: str = "auto"  # interface it listens on; auto: all (0.0.0.0) inside a Ray job or on a
    #                               multi-node cluster, loopback (127.0.0.1) on a local run
    dashboard_port: int = 0  # 0: a free port (printed); fix it to reach the head node through a firewall rule
    tensorboard: bool = False  # scalars to TensorBoard event files in <run_dir>/tensorboard
    wandb: bool = False  # scalars and the recipe to Weights & Biases (files in <run_dir>/wandb)
    wandb_project: str = "streamrl"
    wandb_mode: str = ""  # offline (no network; `wandb sync` uploads later) | online; empty: WANDB_MODE, else offline
    mlflow: bool = False  # scalars and the recipe as params to MLflow
    mlflow_tracking_uri: str = ""  # empty: a local file store in <run_dir>/mlruns
    mlflow_experiment: str = "streamrl"

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("", "offline", "online"):
            raise RecipeError(f"Recipe key 'logging.wandb_mode' = {self.wandb_mode!r}; valid values: offline, online, "
                              "or empty (the WANDB_MODE environment variable, else offline)")
        if not 0 <= self.dashboard_port <= 65535:
            raise RecipeError(f"Recipe key 'logging.dashboard_port' must be in [0, 65535]; got {self.dashboard_port}")


@dataclass
class EvalConfig:
    """Held-out evaluation while training goes on (rl/evaluation.py): rounds of prompts the trainer never
    sees, generated on the rollout engines beside the training rollouts, scored, logged as eval/* metrics."""

    every: int = 0  # steps between eval rounds; 0 = no evaluation
    source: str = ""  # empty: the training task (data.source must be synthetic:NAME) with problems held out of
    #                   training by `seed`; or a .parquet / .jsonl prompt file (data.prompt_key, data.template apply)
    seed: int = 1234  # draws the held-out problems of a synthetic source (training never yields them)
    prompts: int = 64  # prompts per round (a file source: its first this many; 0 = all of them)
    samples_per_prompt: int = 4
    temperature: float = 1.0  # 0 = greedy (then samples_per_prompt must be 1)
    max_tokens: int = 0  # new tokens per sample; 0 = rollout.max_tokens
    reward_fn: str = ""  # module:function; empty = reward.fn (the training reward)
    pass_threshold: float = 1.0  # a sample counts as solved for pass@k when its score is >= this
    pass_k: list[int] = field(default_factory=list)  # eval/pass@k for each k (k <= samples_per_prompt); empty: 1
    #                                                  and samples_per_prompt
    at_start: bool = True  # a round at version 0, before training changes anything (when every > 0)
    at_end: bool = True  # a round on the final weights, logged with the last step (when every > 0)
    timeout_s: float = 600.0  # longest wait for one prompt's samples in a round


@dataclass
class Recipe:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    datastore: DataStoreConfig = field(default_factory=DataStoreConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.tiny.arch": ("qwen2", "llama"),
    "rollout.update_mode": ("interrupt", "recompute", "drain"),
    "rollout.weight_transport": ("auto", "shm", "gloo", "nccl", "ipc"),
    "model.dtype": ("float32", "bfloat16"),
    "resources.device": ("auto", "cpu", "cuda"),
    "resources.placement": ("separate", "timeshare", "share"),
    "algorithm.loss_agg": ("token-mean", "seq-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "algorithm.behaviour_cap_mode": ("clamp", "mask"),
    "algorithm.kl_estimator": ("k1", "k2", "k3"),
    "algorithm.kl_reference": ("behaviour", "initial"),
    "reward.answer_mode": ("strict", "flexible"),
    "reward.isolation": ("thread", "process"),
    "trainer.compute_dtype": ("auto", "float32", "bfloat16"),
    "trainer.reduce_dtype": ("float32", "bfloat16"),
    "trainer.lr_schedule": ("constant", "cosine"),
}


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Flat map of dotted key -> field type for a dataclass tree (sections map to their class)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(ftype, type) and dataclasses.is_dataclass(ftype):
            out[key] = ftype
            out.update(_schema_keys(ftype, key + "."))
        else:
            out[key] = f.type
    return out


SCHEMA_KEYS = _schema_keys(Recipe)

#: keys that were replaced: an old recipe fails with the key to use instead
RENAMED = {
    "rollout.colocate": "'resources.placement': timeshare for colocate=true (engines sleep while the trainer "
                        "steps), separate for false; share keeps both on the GPUs at once, at any eta",
}


def _check_keys(tree: Any, prefix: str, origin: str) -> None:
    """Raise RecipeError on the first key of `tree` that the schema does not declare."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED:
            raise RecipeError(f"Recipe key '{dotted}' (from {origin}) was replaced by {RENAMED[dotted]}")
        if dotted not in SCHEMA_KEYS:
            siblings = sorted(k[len(prefix):] for k in SCHEMA_KEYS if k.startswith(prefix) and "." not in k[len(prefix):])
            close = difflib.get_close_matches(dotted, list(SCHEMA_KEYS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            section = prefix.rstrip(".") or "the top level"
            raise RecipeError(
                f"Unknown recipe key '{dotted}' (from {origin}).{hint} Valid keys in {section}: {', '.join(siblings)}"
            )
        section_cls = SCHEMA_KEYS[dotted]
        if isinstance(section_cls, type) and dataclasses.is_dataclass(section_cls):
            if not isinstance(value, dict):
                raise RecipeError(f"Recipe key '{dotted}' is a section; got the value {value!r} (from {origin})")
            _check_keys(value, dotted + ".", origin)


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Schema defaults <- YAML file <- `a.b=c` overrides, validated; returns a typed Recipe."""
    layers: list[tuple[DictConfig, str]] = []
    if path is not None:
        raw = _load_yaml(Path(path))
        _check_keys(OmegaConf.to_container(raw), "", str(path))
        layers.append((raw, str(path)))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise RecipeError(f"Override {item!r} is not of the form key=value (e.g. rollout.temperature=0.7)")
        # `key=` means the empty string (OmegaConf would read None, which a str key rejects)
        dot = _from_dotlist([f"{item}''" if item.endswith("=") else item for item in overrides])
        _check_keys(OmegaConf.to_container(dot), "", "command-line overrides")
        layers.append((dot, "command-line overrides"))
    merged = OmegaConf.structured(Recipe)
    origin = "the schema defaults"
    try:
        for layer, origin in layers:  # one layer at a time, so a type error names where its value came from
            merged = OmegaConf.merge(merged, layer)
        origin = "the merged recipe"
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise RecipeError(_type_error(exc, origin)) from None
    validate(recipe)
    return recipe


def _from_dotlist(items: list[str]) -> DictConfig:
    """Overrides as a DictConfig; a value YAML cannot read (`a={x}: y`) is one RecipeError naming the override."""
    import yaml

    for item in items:
        try:
            OmegaConf.from_dotlist([item])
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            key, _, value = item.partition("=")
            raise RecipeError(f"Override {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"{key}='\"{value}\"'") from None
    return OmegaConf.from_dotlist(items)


def _load_yaml(path: Path) -> DictConfig:
    """A recipe file as a DictConfig; a missing file, a YAML syntax error or a top level that is not a mapping
    is one RecipeError naming the file (and the 1-based line and column of a syntax error)."""
    import yaml

    if not path.is_file():
        raise RecipeError(f"Recipe file {'is a directory' if path.is_dir() else 'not found'}: {path}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise RecipeError(f"Recipe file {path}{where}: YAML syntax error: {problem}"
                          + (f" ({context})" if context else "")) from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"Recipe file {path}: the top level must be a mapping of sections (model:, rollout:, ...); "
                          f"got a {type(raw).__name__}")
    return raw


#: how a schema type annotation is said in an error message
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "Optional[str]": "a string (or empty)", "Optional[int]": "an integer (or empty)",
               "list[str]": "a list of strings, e.g. [a, b]", "list[int]": "a list of integers, e.g. [1, 4]"}


def _type_error(exc: OmegaConfBaseException, origin: str) -> str:
    """One line for a value of the wrong type, like the unknown-key error: the key, what it takes, what it got."""
    key = (getattr(exc, "full_key", None) or "?").split("[")[0]  # a list element's error names its list
    expected = SCHEMA_KEYS.get(key)
    if isinstance(expected, type) and dataclasses.is_dataclass(expected):
        words = "a section (a mapping of keys)"
    else:
        words = _TYPE_WORDS.get(str(expected), str(expected))
    value = getattr(exc, "value", None)
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if key == "?" or expected is None:  # not a per-key type error: say what OmegaConf said, first line only
        return f"Recipe (from {origin}): {str(exc).splitlines()[0]}"
    return f"Recipe key '{key}' takes {words}; got {value!r} (from {origin})"


def _validate_lora(lora: LoraConfig) -> None:
    if lora.rank < 0:
        raise RecipeError(f"Recipe key 'model.lora.rank' must be >= 0 (0 = off); got {lora.rank}")
    if lora.rank and not lora.target_modules:
        raise RecipeError("Recipe key 'model.lora.target_modules' is empty: name the linear layers to adapt, "
                          "e.g. [q_proj, v_proj]")
    if not 0 <= lora.dropout < 1:
        raise RecipeError(f"Recipe key 'model.lora.dropout' must be in [0, 1); got {lora.dropout}")


def validate(recipe: Recipe) -> None:
    """Checks that types alone cannot express; each error names the key and what would be valid."""
    from rl.core.algorithms import ADVANTAGES, POLICY_LOSSES

    flat = {k: _get(recipe, k) for k in CHOICES}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise RecipeError(f"Recipe key '{key}' = {flat[key]!r}; valid values: {', '.join(allowed)}")
    if recipe.algorithm.advantage not in ADVANTAGES:
        raise RecipeError(f"Recipe key 'algorithm.advantage' = {recipe.algorithm.advantage!r}; valid: {', '.join(ADVANTAGES)}")
    if recipe.algorithm.policy_loss not in POLICY_LOSSES:
        raise RecipeError(
            f"Recipe key 'algorithm.policy_loss' = {recipe.algorithm.policy_loss!r}; valid: {', '.join(POLICY_LOSSES)}"
        )
    positive = [
        "rollout.num_engines", "rollout.tensor_parallel_size", "rollout.group_size", "rollout.max_tokens",
        "trainer.world_size", "trainer.total_steps", "trainer.batch_groups", "reward.num_workers",
        "datastore.num_storage_units", "resources.wait_timeout_s", "reward.timeout_s", "rollout.cpu_threads",
        "reward.processes",
    ]
    for key in positive:
        if not _get(recipe, key) > 0:
            raise RecipeError(f"Recipe key '{key}' must be > 0; got {_get(recipe, key)!r}")
    for key in ("algorithm.eta", "resources.stall_warn_s", "resources.max_restarts"):
        if _get(recipe, key) < 0:
            raise RecipeError(f"Recipe key '{key}' must be >= 0; got {_get(recipe, key)!r}")
    if recipe.trainer.batch_groups % recipe.trainer.world_size:
        raise RecipeError(
            f"Recipe key 'trainer.batch_groups' = {recipe.trainer.batch_groups} must be a multiple of "
            f"'trainer.world_size' = {recipe.trainer.world_size} (each rank trains whole groups)"
        )
    d, need = recipe.datastore, (recipe.algorithm.eta + 2) * recipe.trainer.batch_groups * recipe.rollout.group_size
    if d.capacity_rows < 0 or d.capacity_bytes < 0 or d.lease_s <= 0:
        raise RecipeError("Recipe keys 'datastore.capacity_rows' and 'datastore.capacity_bytes' must be >= 0 and "
                          "'datastore.lease_s' > 0")
    if d.capacity_rows and d.capacity_rows < need:
        raise RecipeError(f"Recipe key 'datastore.capacity_rows' = {d.capacity_rows} is below what the staleness budget "
                          f"can hold at once, (algorithm.eta + 2) * trainer.batch_groups * rollout.group_size = {need}: "
                          f"producers could wait for room that only unfinished groups hold")
    _validate_placement(recipe)
    _validate_trainer(recipe)
    _validate_eval(recipe)
    _validate_lora(recipe.model.lora)
    if recipe.rollout.temperature <= 0:
        raise RecipeError("Recipe key 'rollout.temperature' must be > 0 for RL (sampling, not greedy)")
    if not 0 < recipe.rollout.top_p <= 1:
        raise RecipeError(f"Recipe key 'rollout.top_p' must be in (0, 1]; got {recipe.rollout.top_p}")
    if ":" not in recipe.reward.fn:
        raise RecipeError(f"Recipe key 'reward.fn' = {recipe.reward.fn!r} must be 'module:function' or 'file.py:function'")
    if recipe.reward.answer_mode != "strict" and recipe.reward.fn == "rl.rewards:math_answer":
        raise RecipeError(f"Recipe key 'reward.answer_mode' = {recipe.reward.answer_mode} is read by "
                          "rl.rewards:MathAnswer; the function rl.rewards:math_answer is always strict: set "
                          "reward.fn=rl.rewards:MathAnswer")


def _validate_placement(recipe: Recipe) -> None:
    """What each placement needs (the memory fit on the real GPUs is checked by rl.core.placement before start-up)."""
    r, placement = recipe, recipe.resources.placement
    if placement == "timeshare" and r.algorithm.dynamic_sampling:
        raise RecipeError("Recipe keys 'resources.placement' = timeshare and 'algorithm.dynamic_sampling' = true cannot "
                          "go together: a dropped group's replacement would have to generate while the engines sleep "
                          "for training (use placement share)")
    if placement == "timeshare" and r.algorithm.eta != 0:
        raise RecipeError(f"Recipe key 'resources.placement' = timeshare needs 'algorithm.eta' = 0 (got {r.algorithm.eta}): "
                          "engines sleep while the trainer steps, so nothing generates ahead; for eta >= 1 on the same "
                          "GPUs use resources.placement=share")
    if r.rollout.sleep_level not in (1, 2):
        raise RecipeError(f"Recipe key 'rollout.sleep_level' must be 1 or 2; got {r.rollout.sleep_level}")
    if placement != "separate":
        shards, ranks = r.rollout.num_engines * r.rollout.tensor_parallel_size, r.trainer.world_size
        if shards != ranks:
            raise RecipeError(f"Recipe key 'resources.placement' = {placement} puts one trainer rank and one engine "
                              f"shard on each GPU: rollout.num_engines * rollout.tensor_parallel_size "
                              f"({r.rollout.num_engines} * {r.rollout.tensor_parallel_size} = {shards}) must equal "
                              f"trainer.world_size ({ranks})")
    util, frac = r.rollout.gpu_memory_utilization, r.trainer.gpu_memory_fraction
    if not 0 < util <= 1:
        raise RecipeError(f"Recipe key 'rollout.gpu_memory_utilization' must be in (0, 1]; got {util}")
    if not 0 <= frac <= 1:
        raise RecipeError(f"Recipe key 'trainer.gpu_memory_fraction' must be in [0, 1] (0 = auto); got {frac}")
    if placement == "share":
        total = util + trainer_memory_fraction(recipe)
        if total > 1.0 + 1e-9 or trainer_memory_fraction(recipe) <= 0.02:
            raise RecipeError(f"Recipe keys 'rollout.gpu_memory_utilization' ({util}) + 'trainer.gpu_memory_fraction' "
                              f"({trainer_memory_fraction(recipe):.2f}{' auto' if not frac else ''}) ask for {total:.2f} of "
                              f"each GPU with resources.placement=share: over by {max(total - 1, 0):.2f}, or nothing "
                              "left for the trainer; lower one of them")


def trainer_memory_fraction(recipe: Recipe) -> float:
    """The share of its GPU a trainer rank may allocate with resources.placement=share (auto: what the engine
    leaves, less 5% for the CUDA contexts and the allocators' slack)."""
    frac = recipe.trainer.gpu_memory_fraction
    return frac if frac > 0 else round(0.95 - recipe.rollout.gpu_memory_utilization, 4)


def _validate_trainer(recipe: Recipe) -> None:
    """Ranges of the trainer and algorithm keys."""
    non_negative = ["trainer.micro_batch_tokens", "trainer.micro_batch_size", "trainer.pad_multiple",
                    "trainer.warmup_steps", "trainer.checkpoint_every", "trainer.keep_checkpoints", "algorithm.kl_reward_coef",
                    "algorithm.entropy_coef", "algorithm.value_clip", "trainer.min_lr_ratio"]
    for key in non_negative:
        if _get(recipe, key) < 0:
            raise RecipeError(f"Recipe key '{key}' must be >= 0; got {_get(recipe, key)!r}")
    for key in ("algorithm.gamma", "algorithm.gae_lambda"):
        if not 0 <= _get(recipe, key) <= 1:
            raise RecipeError(f"Recipe key '{key}' must be in [0, 1]; got {_get(recipe, key)!r}")
    _validate_loss(recipe)
    per_rank = recipe.trainer.batch_groups // recipe.trainer.world_size * recipe.rollout.group_size
    if not 1 <= recipe.trainer.mini_batches <= per_rank:
        raise RecipeError(f"Recipe key 'trainer.mini_batches' = {recipe.trainer.mini_batches} must be in "
                          f"[1, {per_rank}] (the samples each rank trains per step)")


def _validate_loss(recipe: Recipe) -> None:
    """The policy loss's keys, and combinations that would train on no signal."""
    a = recipe.algorithm
    if not (a.clip_ratio_c == 0 or a.clip_ratio_c > 1):
        raise RecipeError(f"Recipe key 'algorithm.clip_ratio_c' must be > 1 (dual clip), or 0 to turn dual clip off; "
                          f"got {a.clip_ratio_c!r}")
    if not a.behaviour_weight_cap > 0:
        raise RecipeError(f"Recipe key 'algorithm.behaviour_weight_cap' must be > 0; got {a.behaviour_weight_cap!r}")
    if a.policy_loss == "gspo" and a.loss_agg != "seq-mean":
        raise RecipeError(f"Recipe key 'algorithm.policy_loss' = gspo needs 'algorithm.loss_agg' = seq-mean (got "
                          f"{a.loss_agg}): GSPO's objective averages each sequence's tokens, then the sequences")
    if a.dynamic_sampling and recipe.rollout.group_size == 1:
        raise RecipeError("Recipe key 'algorithm.dynamic_sampling' = true needs 'rollout.group_size' > 1: it drops "
                          "groups whose rewards are all equal, which every group of one sample is")


def _validate_eval(recipe: Recipe) -> None:
    """The eval section's ranges (checked whether or not `eval.every` turns it on, so a recipe that turns it
    on later by an override fails on the key it got wrong, not on one set long ago)."""
    e = recipe.eval
    for key in ("every", "prompts", "max_tokens"):
        if getattr(e, key) < 0:
            raise RecipeError(f"Recipe key 'eval.{key}' must be >= 0; got {getattr(e, key)!r}")
    if e.samples_per_prompt < 1 or e.timeout_s <= 0:
        raise RecipeError(f"Recipe keys 'eval.samples_per_prompt' must be >= 1 and 'eval.timeout_s' > 0; got "
                          f"{e.samples_per_prompt} and {e.timeout_s}")
    if e.temperature < 0:
        raise RecipeError(f"Recipe key 'eval.temperature' must be >= 0 (0 = greedy); got {e.temperature}")
    if e.temperature == 0 and e.samples_per_prompt > 1:
        raise RecipeError(f"Recipe key 'eval.temperature' = 0 (greedy) makes {e.samples_per_prompt} identical samples "
                          f"per prompt: set eval.samples_per_prompt=1, or a temperature > 0 for pass@k")
    bad = [k for k in e.pass_k if not 1 <= k <= e.samples_per_prompt]
    if bad:
        raise RecipeError(f"Recipe key 'eval.pass_k' = {list(e.pass_k)}: each k must be in [1, eval.samples_per_prompt "
                          f"= {e.samples_per_prompt}]; {bad} {'is' if len(bad) == 1 else 'are'} not")
    if e.reward_fn and ":" not in e.reward_fn:
        raise RecipeError(f"Recipe key 'eval.reward_fn' = {e.reward_fn!r} must be 'module:function' or "
                          "'file.py:function'")
    if e.every and not e.source and not recipe.data.source.startswith("synthetic:"):
        raise RecipeError(f"Recipe key 'eval.source' is empty, which holds problems out of a synthetic training task, "
                          f"but data.source = {recipe.data.source!r} is a file: set eval.source to a prompt file of "
                          f"its own")
    if e.every and e.source and os.path.abspath(os.path.expanduser(e.source)) == \
            os.path.abspath(os.path.expanduser(recipe.data.source)):
        raise RecipeError(f"Recipe key 'eval.source' = {e.source!r} is the training file (data.source): evaluation "
                          f"needs prompts the trainer never sees")


def max_response_tokens(recipe: Recipe) -> int:
    """The longest response a sample can have: the horizon of loss_agg seq-mean-token-sum-norm."""
    r = recipe.rollout
    if not r.agent.fn:
        return r.max_tokens
    return r.agent.max_total_tokens or r.max_tokens * r.agent.max_turns


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def resolve_run_dir(recipe: Recipe) -> Path:
    """The run directory: `logging.run_dir`, or runs/<date>-<time>-<name> when empty."""
    if recipe.logging.run_dir:
        return Path(os.path.expanduser(recipe.logging.run_dir))
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{recipe.logging.name}"
