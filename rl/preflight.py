"""Checks in the driver before any actor starts: what would otherwise fail 70-300 s in, after Ray, vLLM and
the trainer have started, fails here in about a second with one line per problem naming the key and the fix.

Checked: the user's plugins (`reward.fn`, `rollout.agent.fn`) import and define the named function; every
tracker the recipe turns on has its package; `model.path` (and `reward.model_path`) names an existing model
directory when it looks like a path; the data source parses (file and 1-based line) and, when the model is a
local directory, every prompt is at least one token after templating.

The tokenizing check loads the tokenizer only from a local directory (a hub id would need the network and is
checked by the run itself); `streamrl run` loads the same tokenizer next anyway, so it costs the run nothing.

For `streamrl submit` (`on_cluster=True`) the run happens elsewhere, and only what this machine knows is
checked: plugin files shipped from here define the function (read, not imported: the cluster may have
packages this machine lacks) and a data file shipped from here parses. Trackers, the model and the tokens
are checked by the job's own `streamrl run` on the cluster, before its actors start.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Callable

from rl.core.config import Recipe, RecipeError

#: recipe keys holding a user function as `module:function` or `path/to/file.py:function`
PLUGIN_KEYS = ("reward.fn", "rollout.agent.fn", "eval.reward_fn")
#: tracker flag -> the module its sink imports
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
MAX_ROW_PROBLEMS = 3  # rows named per problem kind; the rest are counted


class PreflightError(RecipeError):
    """Problems found before start-up; `problems` holds one line each (the message joins them)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def preflight(recipe: Recipe, on_cluster: bool = False) -> list[str]:
    """Run every check; raise PreflightError listing all problems, or return what was checked (one line each)."""
    problems: list[str] = []
    checked: list[str] = []
    for check in _checks(on_cluster):
        found, note = check(recipe)
        problems += found
        if note and not found:
            checked.append(note)
    if problems:
        raise PreflightError(problems)
    return checked


def _checks(on_cluster: bool) -> list[Callable[[Recipe], tuple[list[str], str]]]:
    if on_cluster:
        return [lambda r: check_plugins(r, run_imports=False), lambda r: check_data(r, tokenize=False), check_eval]
    return [check_plugins, check_trackers, check_model_paths, check_data, check_eval]


# ------------------------------------------------------------------ plugins
def check_plugins(recipe: Recipe, run_imports: bool = True) -> tuple[list[str], str]:
    """Each plugin key's module or file exists and has the function. `run_imports` imports it as the workers
    will (its own imports are checked too); otherwise the source is read, not run."""
    from rl.core.plugins import PluginLoadError, load_function

    problems, names = [], []
    for key in PLUGIN_KEYS:
        spec = _get(recipe, key)
        if not spec:
            continue
        names.append(f"{key}={spec}")
        if run_imports:
            try:
                load_function(spec, key)
            except PluginLoadError as exc:
                problems.append(f"{exc}")
        else:
            problem = _plugin_source_problem(spec, key)
            if problem:
                problems.append(problem)
    return problems, f"plugins {'import' if run_imports else 'found'}: {', '.join(names)}" if names else ""


def _plugin_source_problem(spec: str, key: str) -> str | None:
    """Without running it: the file (or a module found here) exists, parses and defines the function."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        return f"Recipe key '{key}' = {spec!r}: expected 'module:function' or 'path/to/file.py:function'"
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            return f"Recipe key '{key}' = {spec!r}: file {path} not found (a path relative to where you run streamrl)"
    else:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            return None  # not here: it may be installed on the cluster; the job's own preflight checks it
        path = Path(found.origin)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        return f"Recipe key '{key}' = {spec!r}: {path}, line {exc.lineno}: syntax error ({exc.msg})"
    defined = _top_level_names(tree)
    if defined is not None and name not in defined:
        return (f"Recipe key '{key}' = {spec!r}: {path} defines no {name!r}; it defines: "
                f"{', '.join(sorted(n for n in defined if not n.startswith('_'))) or 'nothing'}")
    return None


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds at its top level; None when it cannot be known without running it (a star import,
    a module __getattr__)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" for a in node.names):
                return None
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            return None  # conditional definitions: leave them to the import
    return None if "__getattr__" in names else names


# ------------------------------------------------------------------ trackers
def check_trackers(recipe: Recipe) -> tuple[list[str], str]:
    """Each tracker the recipe turns on has its Python package here."""
    from rl.sinks import TRACKERS_EXTRA

    problems, on = [], []
    for flag, module in TRACKER_MODULES.items():
        if getattr(recipe.logging, flag):
            on.append(flag)
            if importlib.util.find_spec(module) is None:
                problems.append(f"Recipe key 'logging.{flag}' = true needs the Python package '{module}', which is not "
                                f"installed: {TRACKERS_EXTRA} (or set logging.{flag}=false)")
    return problems, f"tracker packages installed: {', '.join(on)}" if on else ""


# ------------------------------------------------------------------ model paths
def check_model_paths(recipe: Recipe) -> tuple[list[str], str]:
    """`model.path` and `reward.model_path`: a path-looking value must be a model directory (never a hub id)."""
    from rl.models import check_model_path, looks_like_path

    problems, notes = [], []
    for key, value in (("model.path", recipe.model.path), ("reward.model_path", recipe.reward.model_path)):
        if value:
            problem = check_model_path(value)
            if problem:
                problems.append(problem.replace("'model.path'", f"'{key}'"))
            notes.append(f"{key}={value}" + ("" if looks_like_path(value) else " (a hub id, fetched by the run)"))
    return problems, f"models: {', '.join(notes)}" if notes else ""


# ------------------------------------------------------------------ data
def check_data(recipe: Recipe, tokenize: bool = True) -> tuple[list[str], str]:
    """The data source: a known synthetic task, or a prompt file that parses, templates and (with a local
    model and `tokenize`) gives every prompt at least one token."""
    from rl.data import read_located_prompts, synthetic_task

    d = recipe.data
    try:
        if synthetic_task(d) is not None:
            return [], f"data: {d.source}"
    except RecipeError as exc:
        return [str(exc)], ""
    problems = []
    if not recipe.model.path:
        problems.append(f"Recipe key 'model.path' is empty, and data.source = {d.source!r} is a file: the built-in tiny "
                        "model exists only for synthetic:NAME tasks. Set model.path to a Hugging Face model directory "
                        "(`streamrl make-model` builds the tiny one and prints the path to pass)")
    try:
        located = read_located_prompts(d.source, d.prompt_key)
    except RecipeError as exc:
        return problems + [str(exc)], ""
    template_problem = _template_problem(recipe, located)
    if template_problem:
        return problems + [template_problem], ""
    note = f"data: {len(located)} prompts in {d.source}"
    model_path = recipe.model.path
    if tokenize and model_path and not problems:
        from rl.models import check_model_path, looks_like_path

        if looks_like_path(model_path) and check_model_path(model_path) is None:
            problems += _empty_prompts(recipe, located)
            note += ", none empty after templating and tokenizing"
        else:
            note += " (not tokenized here: model.path is a hub id)"
    return problems, note


def check_eval(recipe: Recipe) -> tuple[list[str], str]:
    """With `eval.every`: the eval prompts can be drawn (held out of a synthetic task, or read from their file)."""
    if not recipe.eval.every:
        return [], ""
    from rl.data import PromptStream
    from rl.evaluation import eval_rows

    try:
        rows = eval_rows(recipe, PromptStream(recipe.data, recipe.seed))
    except RecipeError as exc:
        return [str(exc)], ""
    return [], f"eval: {len(rows)} held-out prompts every {recipe.eval.every} steps"


def _template_problem(recipe: Recipe, located: list[tuple[str, dict]]) -> str | None:
    """The first row that data.template cannot format (the chat template needs the tokenizer: _empty_prompts)."""
    from dataclasses import replace

    from rl.data import PromptFormatter

    fmt = PromptFormatter(replace(recipe.data, chat_template=False), None)
    for where, row in located:
        try:
            fmt(row)
        except RecipeError as exc:
            return f"{where}: {exc}"
    return None


def _empty_prompts(recipe: Recipe, located: list[tuple[str, dict]]) -> list[str]:
    """Rows whose prompt is zero tokens as the feeder tokenizes it (vLLM refuses an empty prompt)."""
    from rl.data import PromptFormatter
    from rl.models import load_tokenizer

    try:
        tok = load_tokenizer(str(Path(recipe.model.path).expanduser()))
        fmt = PromptFormatter(recipe.data, tok)
    except RecipeError as exc:
        return [str(exc)]
    except Exception as exc:  # a directory whose tokenizer does not load: the run would fail the same way
        return [f"Recipe key 'model.path' = {recipe.model.path!r}: its tokenizer does not load ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"]
    ids = tok([fmt(row) for _, row in located], add_special_tokens=not recipe.data.chat_template)["input_ids"]
    empty = [where for (where, _), seq in zip(located, ids) if not seq]
    lines = [f"{where}: the prompt is 0 tokens after data.template and tokenizing (vLLM refuses an empty prompt); "
             "fix or drop the row" for where in empty[:MAX_ROW_PROBLEMS]]
    if len(empty) > MAX_ROW_PROBLEMS:
        lines.append(f"{recipe.data.source}: {len(empty) - MAX_ROW_PROBLEMS} more rows are 0 tokens")
    return lines


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
