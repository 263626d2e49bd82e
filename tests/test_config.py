import pytest

from rl.config import RecipeError, load_recipe


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_load_and_overrides_merge(tmp_path):
    r = load_recipe(write(tmp_path, "rollout:\n  temperature: 0.7\n"), ["trainer.world_size=2", "algorithm.eta=0"])
    assert r.rollout.temperature == 0.7
    assert r.trainer.world_size == 2
    assert r.algorithm.eta == 0
    assert r.rollout.group_size == 8  # schema default kept


def test_unknown_yaml_key_names_key_and_closest(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "rollout:\n  temprature: 0.7\n"))
    msg = str(e.value)
    assert "rollout.temprature" in msg and "rollout.temperature" in msg and "r.yaml" in msg
    assert "group_size" in msg  # the valid keys of the section are listed


def test_unknown_override_key():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["trainer.wrld_size=2"])
    assert "trainer.wrld_size" in str(e.value) and "trainer.world_size" in str(e.value)


def test_unknown_section():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["rolout.temperature=1.0"])
    assert "rolout" in str(e.value) and "rollout" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["trainer.world_size=two"])
    assert "trainer.world_size" in str(e.value)


def test_bad_choice_lists_valid_values():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["algorithm.advantage=ppo2"])
    assert "grpo" in str(e.value)


def test_batch_must_split_over_ranks():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["trainer.world_size=3", "trainer.batch_groups=16"])
    assert "trainer.batch_groups" in str(e.value)


def test_override_without_equals():
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["trainer.world_size"])


def test_missing_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_shipped_recipes_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("recipes/*.yaml")):
        load_recipe(path)


def test_store_capacity_below_the_staleness_budget_is_refused():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["datastore.capacity_rows=100", "trainer.batch_groups=16", "rollout.group_size=8"])
    assert "datastore.capacity_rows" in str(e.value) and "384" in str(e.value)


def test_empty_override_is_the_empty_string():
    assert load_recipe(None, ["data.template="]).data.template == ""
