"""The `streamrl` command line: each failure one line with the right exit code, and nothing started by the
commands that only check or print. Most run `main()` in this process; a few run `python -m rl.cli` to see
exactly what a shell sees (no traceback)."""

import argparse
import subprocess
import sys

import pytest

from rl.cli import build_parser, main


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "rl.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("streamrl ") and out.stdout.split()[1][0].isdigit()


def test_mistyped_command_says_did_you_mean():
    out = cli("rn", "recipes/cpu_default.yaml")
    assert out.returncode == 2 and "unknown command 'rn'. Did you mean 'run'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_positional_has_help_and_defaults_are_shown(capsys):
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subs.items():
        for action in sub._actions:
            if not action.option_strings:
                assert action.help, f"streamrl {name}: positional {action.dest} has no help"
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    assert "(default: 8266)" in capsys.readouterr().out


def test_config_prints_the_resolved_recipe(capsys):
    assert main(["config", "recipes/cpu_default.yaml", "trainer.lr=0.125"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.125" in text and "name: cpu-default" in text
    assert main(["config", "rollout.group_size=3"]) == 0  # no recipe file: the schema defaults
    assert "group_size: 3" in capsys.readouterr().out


def test_dry_run_checks_and_starts_nothing(capsys, monkeypatch):
    import ray

    def no_ray(*args, **kwargs):  # the suite may already hold a Ray session: catch a start, not the state
        raise AssertionError("--dry-run started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["run", "recipes/cpu_default.yaml", "--dry-run", "trainer.total_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "passes the checks; nothing was started" in out and "reward.fn=rl.rewards:arithmetic_exact" in out


def test_dry_run_with_problems_prints_one_line_each_and_exits_2():
    out = cli("run", "recipes/cpu_default.yaml", "--dry-run", "reward.fn=missing_reward.py:score",
              "model.path=./missing_model")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("streamrl: recipe error: ") for line in lines)
    assert "reward.fn" in lines[0] and "model.path" in lines[1]


def test_yaml_syntax_error_is_one_line_rc_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temperature: 0.7\n group_size: [1\n")
    out = cli("run", str(bad))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"streamrl: recipe error: Recipe file {bad}, line 3, column 2: YAML syntax error: " \
                                 "did not find expected key (while parsing a block mapping)"


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert {"datastore", "e2e", "weight-sync"} <= set(names)


def test_make_model_prints_the_model_path_to_pass(tmp_path, capsys):
    assert main(["make-model", "model.tiny.warm_start_steps=0", "model.tiny.hidden_size=32",
                 "model.tiny.intermediate_size=64", f"model.cache_dir={tmp_path}"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"model.path={tmp_path}/")
    assert main(["run", "recipes/cpu_default.yaml", "--dry-run", last]) == 0  # the line works as an override


def test_address_in_gcs_form_is_mapped_with_a_note():
    out = cli("status", "raysubmit_x", "--address", "127.0.0.1:1")  # nothing listens on port 1
    assert out.returncode == 1 and "cannot reach the Ray job server at http://127.0.0.1:1" in out.stderr
    out = cli("list", "--address", "ray://127.0.0.1:10001", timeout=60)
    assert "is Ray Client's port" in out.stderr and "http://127.0.0.1:8265" in out.stderr
