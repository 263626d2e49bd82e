"""Placements (resources.placement): the memory-split arithmetic, the refusals, and where Ray puts the actors.

The Ray session declares two GPUs that do not exist: enough to check that a shared placement puts a trainer
rank and an engine on the same GPU of each bundle (neither actor touches CUDA here)."""

import json

import pytest
import ray

from rl.core.config import RecipeError, load_recipe, trainer_memory_fraction
from rl.core.placement import GIB, ModelShape, check_fit, engine_devices, memory_needs, reserve_placement

QWEN05 = dict(arch="llama", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
              vocab_size=151936)


@pytest.fixture(scope="module")
def qwen05_config(tmp_path_factory):
    """A config.json of Qwen2-0.5B's shape (Llama architecture, untied embeddings); no weights."""
    from transformers import AutoConfig

    out = tmp_path_factory.mktemp("qwen05-shape")
    AutoConfig.for_model("llama", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=False).save_pretrained(out)
    return str(out)


def recipe(*extra):
    return load_recipe(None, ["resources.device=cuda", "model.dtype=bfloat16", *extra])


def test_model_shape_and_memory_needs(qwen05_config):
    shape = ModelShape.from_dir(qwen05_config, 2)
    layer = 2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864 + 2 * 896  # q, o; k, v; MLP; two norms
    assert shape.params == 24 * layer + 2 * 151936 * 896 + 896
    assert shape.kv_bytes_per_token == 2 * 24 * 2 * 64 * 2  # K and V, 24 layers, 2 KV heads of 64, bf16
    r = recipe("rollout.max_model_len=640", "trainer.micro_batch_tokens=16384")
    needs = memory_needs(r, shape)
    assert needs["engine_weights_gib"] == pytest.approx(shape.params * 2 / GIB)
    assert needs["trainer_states_gib"] == pytest.approx(16 * shape.params / GIB)
    assert needs["trainer_logits_gib"] == pytest.approx(4 * 151936 * 16384 / GIB)
    half = memory_needs(recipe("rollout.max_model_len=640", "trainer.world_size=2", "trainer.batch_groups=16",
                               "rollout.tensor_parallel_size=2"), shape)
    assert half["trainer_states_gib"] == pytest.approx(needs["trainer_states_gib"] / 2)  # FSDP shards the state
    assert half["engine_weights_gib"] == pytest.approx(needs["engine_weights_gib"] / 2)  # TP shards the weights


def test_fit_check_names_the_key_and_the_shortfall(qwen05_config):
    shape = ModelShape.from_dir(qwen05_config, 2)
    r = recipe("resources.placement=share", "rollout.gpu_memory_utilization=0.35", "algorithm.eta=1",
               "trainer.micro_batch_tokens=16384")
    shares = check_fit(r, memory_needs(r, shape), 141.0)  # an H200: both fit
    assert shares["engine_share_gib"] == pytest.approx(0.35 * 141)
    assert shares["trainer_share_gib"] == pytest.approx(0.60 * 141)
    with pytest.raises(RecipeError, match=r"rollout.gpu_memory_utilization=0.35 .* short by [0-9.]+ GiB"):
        check_fit(r, memory_needs(r, shape), 4.0)  # a 4 GiB GPU: the engine's 1.4 GiB share is too small
    tight = recipe("resources.placement=share", "rollout.gpu_memory_utilization=0.8", "trainer.gpu_memory_fraction=0.15",
                   "trainer.micro_batch_tokens=16384")
    with pytest.raises(RecipeError, match=r"A trainer rank does not fit: it may use 3.6 GiB .* trainer.gpu_memory_fraction"):
        check_fit(tight, memory_needs(tight, shape), 24.0)


def test_placement_keys_are_checked_before_start():
    assert trainer_memory_fraction(recipe("resources.placement=share", "rollout.gpu_memory_utilization=0.35")) == 0.6
    with pytest.raises(RecipeError, match="over by 0.10"):
        recipe("resources.placement=share", "rollout.gpu_memory_utilization=0.7", "trainer.gpu_memory_fraction=0.4")
    with pytest.raises(RecipeError, match="needs 'algorithm.eta' = 0 .* resources.placement=share"):
        recipe("resources.placement=timeshare", "algorithm.eta=1")
    with pytest.raises(RecipeError, match=r"rollout.num_engines \* rollout.tensor_parallel_size \(1 \* 1 = 1\) must equal "
                                          r"trainer.world_size \(2\)"):
        recipe("resources.placement=share", "trainer.world_size=2")
    with pytest.raises(RecipeError, match="'rollout.colocate' .* was replaced by 'resources.placement': timeshare"):
        recipe("rollout.colocate=true")
    with pytest.raises(RecipeError, match="valid values: separate, timeshare, share"):
        recipe("resources.placement=shared")


def test_tensor_parallel_engines_see_the_gpus_of_their_bundles():
    assert engine_devices([0, 2], 2, [["3"], ["1"], ["0"], ["2"]]) == [["3", "1"], ["0", "2"]]


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["share", "timeshare"])
def test_shared_placement_puts_a_rank_and_an_engine_on_each_gpu(ray_session, tiny_model, placement):
    import torch

    from rl.controller import spawn_rollout_workers
    from trainer.group import TrainerGroup

    if torch.cuda.is_available():
        pytest.skip("Ray counts two made-up GPUs only on a machine without CUDA")

    r = load_recipe(None, [f"resources.placement={placement}", "algorithm.eta=0", "trainer.world_size=2",
                           "trainer.batch_groups=4", "rollout.num_engines=2", f"model.path={tiny_model}"])
    engines, ranks = reserve_placement(r, gpu=True)
    assert ranks is not None and engines.pg is ranks.pg and engines.gpus == ranks.gpus == 0.5
    workers = spawn_rollout_workers(r, tiny_model, None, "cuda", engines)  # actors only: no engine starts
    group = TrainerGroup(r, tiny_model, None, "train", "cuda", placement=ranks)
    try:
        where = lambda a: ray.get(a.__ray_call__.remote(  # noqa: E731
            lambda self: (ray.get_gpu_ids(), ray.get_runtime_context().get_placement_group_id())), timeout=60)
        engine_at, rank_at = [where(w) for w in workers], [where(x) for x in group.ranks]
        for k in range(2):
            assert engine_at[k] == rank_at[k], (k, engine_at, rank_at)  # same GPU, same placement group
        assert engine_at[0][0] != engine_at[1][0], "the two bundles got the same GPU"
        sleeps = [ray.get(w.__ray_call__.remote(lambda self: self.sleep_mode), timeout=60) for w in workers]
        assert sleeps == [placement == "timeshare"] * 2
        print(json.dumps({"engines": engine_at, "ranks": rank_at}))
    finally:
        for w in workers:
            ray.kill(w)
        for x in group.ranks:
            ray.kill(x)
        ray.util.remove_placement_group(engines.pg)
