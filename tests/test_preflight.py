"""The checks made in the driver before any actor starts (rl/preflight.py): each problem is one line naming the
key or the file and line, and nothing here starts Ray."""

import json

import pytest

from rl import preflight as pf
from rl.core.config import load_recipe
from rl.preflight import PreflightError, preflight


def problems(overrides, on_cluster=False):
    with pytest.raises(PreflightError) as e:
        preflight(load_recipe(None, overrides), on_cluster=on_cluster)
    return e.value.problems


def jsonl(tmp_path, lines, name="prompts.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


@pytest.fixture
def model_dir(tmp_path):
    """A model directory whose tokenizer adds no BOS, so an empty prompt is 0 tokens (as with many real models)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "model"
    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", *[chr(c) for c in range(32, 127)]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>").save_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def test_defaults_pass_and_say_what_was_checked():
    checked = preflight(load_recipe(None))
    assert any("reward.fn=rl.rewards:arithmetic_exact" in line for line in checked)


def test_missing_reward_file_is_named():
    (line,) = problems(["reward.fn=no_such_reward.py:score"])
    assert "reward.fn" in line and "no_such_reward.py" in line and "not found" in line


def test_missing_reward_module_and_function_are_named():
    assert "no_such_module_xyz" in problems(["reward.fn=no_such_module_xyz:score"])[0]
    (line,) = problems(["reward.fn=rl.rewards:no_such_fn"])
    assert "reward.fn" in line and "no_such_fn" in line and "arithmetic_exact" in line  # what it has


def test_missing_agent_function_is_named():
    (line,) = problems(["rollout.agent.fn=tests/toy_tool.py:nothing"])
    assert "rollout.agent.fn" in line and "calculator" in line


def test_submit_reads_plugin_files_without_running_them(tmp_path):
    """On a cluster the plugin's own imports may exist where this machine has none: the file is parsed, not run."""
    plugin = tmp_path / "reward.py"
    plugin.write_text("import package_only_on_the_cluster\n\ndef score(sample):\n    return 1.0\n")
    preflight(load_recipe(None, [f"reward.fn={plugin}:score"]), on_cluster=True)
    (line,) = problems([f"reward.fn={plugin}:scor"], on_cluster=True)
    assert "reward.fn" in line and "'scor'" in line and "score" in line
    plugin.write_text("def score(sample:\n    return 1.0\n")
    (line,) = problems([f"reward.fn={plugin}:score"], on_cluster=True)
    assert f"{plugin}, line 1" in line and "syntax error" in line


def test_tracker_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(pf.TRACKER_MODULES, "wandb", "wandb_is_not_installed_here")
    (line,) = problems(["logging.wandb=true"])
    assert "logging.wandb" in line and "pip install 'streamrl[trackers]'" in line


def test_file_data_needs_model_path(tmp_path):
    data = jsonl(tmp_path, ['{"prompt": "1+1="}'])
    (line,) = problems([f"data.source={data}"])
    assert "'model.path' is empty" in line and "streamrl make-model" in line


@pytest.mark.parametrize("path", ["./no_such_model", "/no/such/model", "~/no_such_model_dir", "a/b/c"])
def test_a_path_looking_model_path_is_never_a_hub_id(path):
    (line,) = problems([f"model.path={path}"])
    assert "model.path" in line and "no such directory" in line and path in line


def test_hub_id_is_left_to_the_run_and_bad_directories_are_refused(tmp_path):
    checked = preflight(load_recipe(None, ["model.path=Qwen/Qwen2.5-0.5B-Instruct"]))
    assert any("hub id" in line for line in checked)
    (tmp_path / "empty").mkdir()
    assert "without config.json" in problems([f"model.path={tmp_path / 'empty'}"])[0]
    (tmp_path / "f").write_text("x")
    assert "is a file" in problems([f"model.path={tmp_path / 'f'}"])[0]


def test_empty_prompt_file(tmp_path, model_dir):
    data = jsonl(tmp_path, [])
    (line,) = problems([f"data.source={data}", f"model.path={model_dir}"])
    assert str(data) in line and "no rows" in line


def test_invalid_jsonl_names_file_and_1_based_line(tmp_path, model_dir):
    data = jsonl(tmp_path, ['{"prompt": "1+1="}', "", '{"prompt": "2+2=",'])
    (line,) = problems([f"data.source={data}", f"model.path={model_dir}"])
    assert f"{data}, line 3: not valid JSON" in line


def test_row_without_the_prompt_field(tmp_path, model_dir):
    data = jsonl(tmp_path, ['{"question": "1+1="}'])
    (line,) = problems([f"data.source={data}", f"model.path={model_dir}"])
    assert f"{data}, line 1" in line and "'prompt'" in line and "question" in line


def test_template_with_a_missing_field_names_the_line(tmp_path, model_dir):
    data = jsonl(tmp_path, ['{"prompt": "1+1=", "topic": "sums"}', '{"prompt": "2+2="}'])
    (line,) = problems([f"data.source={data}", f"model.path={model_dir}", "data.template=Topic {topic}, {prompt}"])
    assert f"{data}, line 2" in line and "topic" in line


def test_prompt_of_zero_tokens_after_templating_names_the_line(tmp_path, model_dir):
    data = jsonl(tmp_path, ['{"prompt": "1+1="}', "", '{"prompt": ""}'])
    (line,) = problems([f"data.source={data}", f"model.path={model_dir}"])
    assert f"{data}, line 3" in line and "0 tokens" in line
    ok = jsonl(tmp_path, ['{"prompt": "1+1="}'], "ok.jsonl")
    checked = preflight(load_recipe(None, [f"data.source={ok}", f"model.path={model_dir}"]))
    assert any("none empty" in c for c in checked)


def test_all_problems_are_reported_at_once(tmp_path):
    found = problems(["reward.fn=missing.py:score", "model.path=./missing_model"])
    assert len(found) == 2 and "reward.fn" in found[0] and "model.path" in found[1]


def test_parquet_rows_are_named_1_based(tmp_path, model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"question": ["1+1=", "", "2+2="]}), data)
    (line,) = problems([f"data.source={data}", "data.prompt_key=question", f"model.path={model_dir}"])
    assert f"{data}, row 2" in line and "0 tokens" in line
