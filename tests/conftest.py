"""Shared fixtures: one real local Ray for the session, and a tiny model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        import torch

        # without CUDA, two GPUs as far as Ray counts (none is real): placement tests place actors on them
        fake_gpus = None if torch.cuda.is_available() else 2
        ray.init(address="local", num_cpus=8, num_gpus=fake_gpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_cache) -> str:
    """A small warm-started model (few supervised steps: enough to load and generate, built in seconds)."""
    from rl.core.config import load_recipe
    from rl.data import synthetic_task
    from rl.models import make_tiny_model

    r = load_recipe(None, ["model.tiny.warm_start_steps=30", f"model.cache_dir={model_cache}"])
    return str(make_tiny_model(r.model.tiny, synthetic_task(r.data), r.model.cache_dir))
