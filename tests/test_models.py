import json
from pathlib import Path

import torch

from rl.models import load_causal_lm, load_tokenizer


def test_char_tokenizer_round_trip(tiny_model):
    tok = load_tokenizer(tiny_model)
    ids = tok("12+7=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "12+7="
    assert tok.decode(tok("x y!")["input_ids"], skip_special_tokens=True) == "x y!"


def test_built_model_is_a_normal_hf_directory(tiny_model):
    d = Path(tiny_model)
    assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
    meta = json.loads((d / "streamrl_model.json").read_text())
    assert meta["warm_start"]["loss"] > 0
    model = load_causal_lm(tiny_model)
    out = model(torch.tensor([[1, 20, 21]]))
    assert out.logits.shape[-1] == model.config.vocab_size


def test_cache_reuses_the_built_model(tiny_model, model_cache):
    from rl.core.config import load_recipe
    from rl.data import synthetic_task
    from rl.models import make_tiny_model

    r = load_recipe(None, ["model.tiny.warm_start_steps=30", f"model.cache_dir={model_cache}"])
    mtime = (Path(tiny_model) / "config.json").stat().st_mtime
    again = make_tiny_model(r.model.tiny, synthetic_task(r.data), r.model.cache_dir)
    assert str(again) == tiny_model and (again / "config.json").stat().st_mtime == mtime
