import pytest

from rl.core.config import RecipeError, load_recipe


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


@pytest.mark.parametrize("override, named", [
    ("algorithm.clip_ratio_c=1.0", "algorithm.clip_ratio_c"),
    ("algorithm.clip_ratio_c=-3", "algorithm.clip_ratio_c"),
    ("algorithm.behaviour_cap_mode=drop", "clamp, mask"),
    ("algorithm.behaviour_weight_cap=0", "algorithm.behaviour_weight_cap"),
    ("algorithm.loss_agg=sum", "seq-mean-token-sum-norm"),
    ("algorithm.policy_loss=gspo2", "gspo"),
])
def test_loss_keys_are_validated(override, named):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert named in str(e.value)


def test_loss_key_defaults_and_choices_match_the_algorithms():
    from rl.core.algorithms import BEHAVIOUR_CAP_MODES, LOSS_AGGREGATIONS, LossConfig
    from rl.core.config import CHOICES

    a = load_recipe(None).algorithm
    assert (a.clip_ratio_c, a.behaviour_cap_mode, a.loss_agg) == (3.0, "clamp", "token-mean")
    assert a.clip_ratio_c == LossConfig().clip_ratio_c
    assert CHOICES["algorithm.loss_agg"] == LOSS_AGGREGATIONS
    assert CHOICES["algorithm.behaviour_cap_mode"] == BEHAVIOUR_CAP_MODES
    assert load_recipe(None, ["algorithm.clip_ratio_c=0"]).algorithm.clip_ratio_c == 0  # dual clip off


def test_gspo_needs_seq_mean():
    with pytest.raises(RecipeError, match="algorithm.loss_agg' = seq-mean"):
        load_recipe(None, ["algorithm.policy_loss=gspo"])
    r = load_recipe(None, ["algorithm.policy_loss=gspo", "algorithm.loss_agg=seq-mean", "algorithm.clip_low=3e-4",
                           "algorithm.clip_high=4e-4"])
    assert r.algorithm.policy_loss == "gspo"


def test_group_of_one():
    """Group estimators use the raw reward with one sample per prompt; dynamic sampling would drop every group."""
    assert load_recipe(None, ["rollout.group_size=1", "algorithm.advantage=grpo"]).rollout.group_size == 1
    with pytest.raises(RecipeError, match="rollout.group_size"):
        load_recipe(None, ["rollout.group_size=1", "algorithm.dynamic_sampling=true"])


def test_max_response_tokens_is_the_horizon_of_the_norm_aggregation():
    from rl.core.config import max_response_tokens

    assert max_response_tokens(load_recipe(None, ["rollout.max_tokens=32"])) == 32
    agent = ["rollout.max_tokens=32", "rollout.agent.fn=tests/toy_tool.py:calculator", "rollout.agent.max_turns=3"]
    assert max_response_tokens(load_recipe(None, agent)) == 96
    assert max_response_tokens(load_recipe(None, agent + ["rollout.agent.max_total_tokens=50"])) == 50


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "rollout:\n  temperature: 0.7\n group_size: [1\n"))
    msg = str(e.value)
    assert "r.yaml, line 3, column 2: YAML syntax error" in msg and "\n" not in msg


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("override, expected", [
    ("trainer.world_size=two", "Recipe key 'trainer.world_size' takes an integer; got 'two' (from command-line overrides)"),
    ("rollout.temperature=hot", "Recipe key 'rollout.temperature' takes a number; got 'hot'"),
    ("logging.tensorboard=maybe", "Recipe key 'logging.tensorboard' takes true or false; got 'maybe'"),
    ("rollout.stop=x", "Recipe key 'rollout.stop' takes a list of strings"),
])
def test_wrong_type_is_one_line_like_the_unknown_key_error(override, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert expected in str(e.value) and "\n" not in str(e.value) and "full_key" not in str(e.value)


def test_wrong_type_in_a_file_names_the_file(tmp_path):
    with pytest.raises(RecipeError, match=r"'rollout.temperature' takes a number; got 'hot' \(from .*r.yaml\)"):
        load_recipe(write(tmp_path, "rollout:\n  temperature: hot\n"))


def test_override_value_that_is_not_yaml_says_to_quote_it():
    with pytest.raises(RecipeError, match="quote it"):
        load_recipe(None, ["data.template={topic}: {prompt}"])
