"""LoRA (model.lora): only adapters train, FSDP2 shards the frozen base, a sync sends only the merged weights
of the adapted modules (fewer bytes than a full sync) and leaves the engine computing the trainer's
logprobs, and the export loads in transformers (PEFT adapter and merged model) and the merged model in vLLM."""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from rl.core.config import LoraConfig, RecipeError, TrainerConfig, load_recipe

TARGETS = ["q_proj", "v_proj", "down_proj"]  # q and v: part of the fused qkv layer; k must travel too


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo process group in this process: FSDP2 and the export need one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Move every adapter tensor (B starts at zero, so a fresh adapter changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                local = p.to_local() if hasattr(p, "to_local") else p
                local.add_(torch.randn(local.shape, generator=g) * 0.2)


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


IDS = [1, 20, 21, 27, 30, 31, 29, 2]


def test_recipe_keys_are_checked():
    r = load_recipe(None, ["model.lora.rank=8", "model.lora.target_modules=[q_proj]", "trainer.export_merged=true"])
    assert (r.model.lora.rank, r.model.lora.target_modules, r.trainer.export_merged) == (8, ["q_proj"], True)
    with pytest.raises(RecipeError, match=r"'model.lora.rank' must be >= 0"):
        load_recipe(None, ["model.lora.rank=-1"])
    with pytest.raises(RecipeError, match=r"'model.lora.dropout' must be in \[0, 1\)"):
        load_recipe(None, ["model.lora.rank=4", "model.lora.dropout=1.5"])


def test_a_target_that_matches_nothing_names_the_key_and_the_layers(tiny_model):
    from transformers import AutoModelForCausalLM

    from trainer.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'model.lora.target_modules' = \['qproj'\] matches no layer .*'q_proj'"):
        apply_lora(model, LoraConfig(rank=4, target_modules=["qproj"]))


def test_merged_weights_give_the_adapted_models_outputs(tiny_model):
    """What a sync sends, loaded into the base model, computes what the LoRA model computes; and it is
    only the adapted modules (plus the rest of their fused layers), fewer bytes than the whole model."""
    from transformers import AutoModelForCausalLM

    from trainer.lora import apply_lora, merged, sync_tensors

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    full_names = dict(base.state_dict())
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                       LoraConfig(rank=4, alpha=8, target_modules=TARGETS))
    _randomize_adapters(model, 0)
    state = model.state_dict()
    sent = {t.name: merged(t, state, lambda x: x) for t in sync_tensors(model)}

    leaves = {n.rsplit(".", 2)[-2] for n in sent}
    assert leaves == {"q_proj", "k_proj", "v_proj", "down_proj"}  # k_proj: unchanged, but part of qkv_proj
    assert set(sent) <= set(full_names)
    lora_bytes = sum(t.numel() * 4 for t in sent.values())
    full_bytes = sum(t.numel() * 4 for t in full_names.values())
    assert lora_bytes < 0.5 * full_bytes
    assert torch.equal(sent["model.layers.0.self_attn.k_proj.weight"], full_names["model.layers.0.self_attn.k_proj.weight"])

    moved = (_logits(model, IDS) - _logits(base, IDS)).abs().max().item()
    base.load_state_dict(sent, strict=False)
    diff = (_logits(model, IDS) - _logits(base, IDS)).abs().max().item()
    assert moved > 1e-2 and diff < 1e-4, (moved, diff)


@pytest.mark.slow
def test_only_adapters_train_on_a_sharded_base_and_the_export_loads(one_rank_group, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import export_hf
    from trainer.model import build_policy

    model = build_policy(tiny_model, TrainerConfig(), torch.device("cpu"), 0,
                         LoraConfig(rank=4, alpha=8, target_modules=TARGETS))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * 2 * len(TARGETS)  # A and B per target module, two layers
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(hasattr(p, "full_tensor") for p in frozen)  # FSDP2 shards the frozen base too

    _randomize_adapters(model, 1)
    expected = _logits(model, IDS)
    out = export_hf(model, tiny_model, tmp_path / "final_model", torch.float32, merged=True)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert (_logits(base, IDS) - expected).abs().max().item() > 1e-2
    assert (_logits(adapted, IDS) - expected).abs().max().item() < 1e-4
    assert (_logits(merged, IDS) - expected).abs().max().item() < 1e-4


@pytest.mark.slow
def test_a_step_moves_the_adapters_and_leaves_the_base(one_rank_group, tiny_model):
    """One GRPO step of the real PolicyTrainer: AdamW holds only the adapters, the base is bit-identical."""
    from trainer.batching import Sample
    from trainer.engine import PolicyTrainer

    recipe = load_recipe(None, [f"model.path={tiny_model}", "trainer.world_size=1", "trainer.compute_dtype=float32",
                                "model.lora.rank=4", "trainer.lr=1e-2"])
    pt = PolicyTrainer(recipe, tiny_model, torch.device("cpu"))
    before = {n: p.detach().to_local().clone() for n, p in pt.model.named_parameters()}
    assert sum(len(g["params"]) for g in pt.optim.param_groups) == sum(".lora_" in n for n in before)
    samples = [Sample([1, 20, 21], [30 + j, 31, 2], torch.full((3,), -2.0), torch.ones(3), float(j % 2), 0, 0)
               for j in range(4)]
    pt.train(samples, 0)
    after = {n: p.detach().to_local() for n, p in pt.model.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # B starts at zero, so the first step moves every B and no A (A's gradient is B's transpose times ...)
    assert changed == {n for n in before if ".lora_B." in n}


@pytest.mark.slow
def test_a_checkpoint_restores_adapters_and_their_optimizer_state(one_rank_group, tiny_model, tmp_path):
    """DCP save/load of a LoRA trainer (AdamW holds only the adapters): a fresh trainer loads it and then
    takes the same next step as the one that saved it."""
    import torch.distributed as dist

    from trainer import checkpoint
    from trainer.batching import Sample
    from trainer.engine import PolicyTrainer

    recipe = load_recipe(None, [f"model.path={tiny_model}", "trainer.world_size=1", "trainer.compute_dtype=float32",
                                "model.lora.rank=4", "trainer.lr=1e-2"])
    samples = [Sample([1, 20, 21], [30 + j, 31, 2], torch.full((3,), -2.0), torch.ones(3), float(j % 2), 0, 0)
               for j in range(4)]
    group = dist.new_group(backend="gloo")
    first = PolicyTrainer(recipe, tiny_model, torch.device("cpu"))
    first.train(samples, 0)
    checkpoint.save(first, tmp_path / "step_1", group, use_async=False)
    first.train(samples, 1)
    second = PolicyTrainer(recipe, tiny_model, torch.device("cpu"))
    assert checkpoint.load(second, tmp_path / "step_1", group) == first.version - 1
    second.train(samples, 1)
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a.detach().to_local(), b.detach().to_local()), name


# ------------------------------------------------------------------ the real stack: trainer ranks -> vLLM
def _adapter_perturber():
    """Runs inside a trainer rank (Ray's __ray_call__): move the rank's adapter shards only (the base is
    frozen in a LoRA run), set the version it sends next."""

    def perturb(worker, seed: int, version: int) -> int:
        import torch

        g = torch.Generator().manual_seed(seed * 100 + worker.rank)
        with torch.no_grad():
            for name, p in worker.model.named_parameters():
                if ".lora_" in name:
                    local = p.to_local() if hasattr(p, "to_local") else p
                    local.add_((torch.randn(local.shape, generator=g) * 0.2).to(local.device, local.dtype))
        worker.version = version
        return version

    return perturb


@pytest.mark.slow
def test_lora_sync_sends_fewer_bytes_and_the_engine_matches_the_trainer(ray_session, tiny_model, tmp_path):
    from datastore.client import DataStore
    from rl.models import load_tokenizer
    from rl.weight_sync import WeightSync
    from rollout.worker import SAMPLE_FIELDS, RolloutActor, stop_workers
    from trainer.group import TrainerGroup
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(None, [
        f"model.path={tiny_model}", "trainer.world_size=2", "trainer.batch_groups=2", "rollout.weight_transport=gloo",
        "rollout.weight_bucket_mb=0.25", "resources.wait_timeout_s=120", f"logging.run_dir={tmp_path}",
        "rollout.max_model_len=64", "trainer.compute_dtype=float32", "algorithm.eta=0",
        "model.lora.rank=4", "model.lora.alpha=8", f"model.lora.target_modules=[{','.join(TARGETS)}]",
        "trainer.export_merged=true"])
    store = DataStore.create(1, tag_fields=["version"], declared_fields=SAMPLE_FIELDS, timeout_s=60)
    engine = RolloutActor.options(num_cpus=0).remote(0, tiny_model, recipe.rollout, store, "p", "float32", "cpu", 0, 120)
    group = TrainerGroup(recipe, tiny_model, store, "p", "cpu")
    try:
        ray.get(engine.start.remote(), timeout=400)
        group.setup()
        ws = WeightSync(group, [engine], "gloo", 1, "cpu", colocated=True, timeout_s=120)
        ws.open()
        tok = load_tokenizer(tiny_model)
        ids = tok("13+5=")["input_ids"] + tok("18", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        full_bytes = sum(p.numel() * 4 for p in base.parameters())  # tied embeddings count once, as they travel
        for version in (1, 2):  # two syncs: the second replaces the first adapter's merge, not adds to it
            before = ray.get(engine.prompt_logprobs.remote(ids), timeout=60)
            ray.get([r.__ray_call__.remote(_adapter_perturber(), version, version) for r in group.ranks], timeout=60)
            metrics = asyncio.run(ws.push())
            trainer_lp = group.sequence_logprobs(ids)
            after = ray.get(engine.prompt_logprobs.remote(ids), timeout=60)
            diff = max(abs(x - y) for x, y in zip(trainer_lp[1:], after[1:]))
            moved = max(abs(x - y) for x, y in zip(before[1:], after[1:]))
            print(f"LoRA sync v{version}: max |trainer - engine| logprob = {diff:.2e} (moved {moved:.2f}); "
                  f"{metrics['sync/bytes'] / 1e6:.3f} MB vs {full_bytes / 1e6:.3f} MB for a full sync, "
                  f"{metrics['sync/total_s']:.3f} s")
            assert moved > 1e-2, "the engine's logprobs did not change: no weights arrived"
            assert diff < 1e-4
            assert 0 < metrics["sync/bytes"] < 0.5 * full_bytes
            assert ray.get(engine.stats.remote(), timeout=30).version == version

        # the export of the two ranks' shards computes what the engine serves, as an adapter and merged
        from peft import PeftModel

        out = group.export_hf(tmp_path / "final_model")
        adapted = PeftModel.from_pretrained(base, str(out))
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32)
        for name, model in (("adapter", adapted), ("merged", merged)):
            lp = torch.log_softmax(_logits(model, ids), -1)
            exported = [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
            assert max(abs(x - y) for x, y in zip(exported, after[1:])) < 1e-4, name
        # and the merged model loads in vLLM as any model directory does, serving the same logprobs
        served = RolloutActor.options(num_cpus=0).remote(1, str(out / "merged"), recipe.rollout, store, "p", "float32",
                                                         "cpu", 0, 120)
        try:
            ray.get(served.start.remote(), timeout=400)
            from_vllm = ray.get(served.prompt_logprobs.remote(ids), timeout=60)
        finally:
            stop_workers([served])
        assert max(abs(x - y) for x, y in zip(from_vllm[1:], after[1:])) < 1e-4
    finally:
        stop_workers([engine])
        group.shutdown()
        store.shutdown()
