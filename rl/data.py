"""Prompt sources: synthetic verifiable tasks and local parquet / jsonl files.

A source yields rows: dicts with a `prompt` string and any other fields of the dataset (ground truth and
the like), which travel with the sample to the reward function as `sample.row`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

from rl.core.config import ArithmeticConfig, DataConfig, RecipeError


class SyntheticTask(Protocol):
    name: str

    def rows(self, n: int, seed: int) -> list[dict]: ...

    def hold_out(self, n: int, seed: int) -> list[dict]: ...

    def describe(self) -> dict: ...


@dataclass
class ArithmeticTask:
    """`a op b =` with the exact answer as ground truth: short, verifiable, learnable by a tiny model."""

    cfg: ArithmeticConfig
    name: str = "arithmetic"
    held_out: frozenset[str] = frozenset()  # prompts `rows` never yields: the eval set (`hold_out`)

    def __post_init__(self) -> None:
        bad = set(self.cfg.ops) - set("+-*")
        if bad or not self.cfg.ops:
            raise RecipeError(f"data.arithmetic.ops = {self.cfg.ops!r}: use characters from '+-*'")
        if self.cfg.min_value > self.cfg.max_value:
            raise RecipeError("data.arithmetic.min_value must be <= data.arithmetic.max_value")

    def row(self, rng: random.Random) -> dict:
        a = rng.randint(self.cfg.min_value, self.cfg.max_value)
        b = rng.randint(self.cfg.min_value, self.cfg.max_value)
        op = rng.choice(self.cfg.ops)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        return {"prompt": f"{a}{op}{b}=", "answer": str(answer)}

    def rows(self, n: int, seed: int) -> list[dict]:
        """n rows drawn with `seed`, skipping held-out problems (redrawn from the same generator, so the
        stream stays reproducible; with nothing held out it is the plain draw)."""
        rng = random.Random(seed)
        out: list[dict] = []
        while len(out) < n:
            row = self.row(rng)
            if row["prompt"] not in self.held_out:
                out.append(row)
        return out

    def space(self) -> int:
        """How many distinct problems the task has."""
        width = self.cfg.max_value - self.cfg.min_value + 1
        return len(set(self.cfg.ops)) * width * width

    def hold_out(self, n: int, seed: int) -> list[dict]:
        """n distinct problems drawn with `seed`, removed from every later `rows` draw: an eval set that
        training never yields. At most half the problems may be held out."""
        if n > self.space() // 2:
            raise RecipeError(f"eval.prompts = {n} would hold out more than half of the {self.space()} problems of "
                              f"data.arithmetic (ops {self.cfg.ops!r}, {self.cfg.min_value}..{self.cfg.max_value}); "
                              f"lower eval.prompts or widen data.arithmetic.max_value")
        rng, seen, out = random.Random(seed), set(), []
        while len(out) < n:
            row = self.row(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                out.append(row)
        self.held_out = frozenset(seen)
        return out

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.cfg)}


SYNTHETIC_TASKS = {"arithmetic": lambda cfg: ArithmeticTask(cfg.arithmetic)}


def synthetic_task(cfg: DataConfig) -> SyntheticTask | None:
    """The synthetic task named by `data.source = synthetic:NAME`, or None for a file source."""
    if not cfg.source.startswith("synthetic:"):
        return None
    name = cfg.source.split(":", 1)[1]
    if name not in SYNTHETIC_TASKS:
        raise RecipeError(f"data.source = {cfg.source!r}: unknown synthetic task; valid: "
                          + ", ".join(f"synthetic:{k}" for k in SYNTHETIC_TASKS))
    return SYNTHETIC_TASKS[name](cfg)


def read_prompt_file(path: str | Path, prompt_key: str = "prompt") -> list[dict]:
    """All rows of a local .parquet or .jsonl file; the prompt column is renamed to `prompt`."""
    return [row for _, row in read_located_prompts(path, prompt_key)]


def read_located_prompts(path: str | Path, prompt_key: str = "prompt") -> list[tuple[str, dict]]:
    """Each row of a prompt file with where it is ("FILE, line N" for JSONL, "FILE, row N" for parquet; both
    1-based), so any error about a row can name it. Raises RecipeError naming the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise RecipeError(f"data.source = {str(path)!r}: file not found")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if prompt_key not in table.column_names:
            raise RecipeError(f"data.prompt_key = {prompt_key!r} is not a column of {p}; columns: "
                              f"{', '.join(table.column_names)}")
        located = [(f"{p}, row {i + 1}", row) for i, row in enumerate(table.to_pylist())]
    elif p.suffix in (".jsonl", ".json"):
        located = list(_read_jsonl(p))
    else:
        raise RecipeError(f"data.source = {str(path)!r}: use a .parquet or .jsonl file, or synthetic:NAME")
    if not located:
        shape = "one JSON object per line" if p.suffix != ".parquet" else "one row per prompt"
        raise RecipeError(f"data.source = {str(path)!r} holds no rows: it needs {shape}, with the prompt in {prompt_key!r}")
    for where, row in located:
        if prompt_key not in row:
            raise RecipeError(f"{where}: no {prompt_key!r} field (data.prompt_key); it has: {', '.join(row) or 'nothing'}")
        if not isinstance(row[prompt_key], str):
            raise RecipeError(f"{where}: {prompt_key!r} is {type(row[prompt_key]).__name__} {row[prompt_key]!r}, not text")
        row["prompt"] = row.pop(prompt_key)
    return located


def _read_jsonl(p: Path) -> Iterator[tuple[str, dict]]:
    """JSON Lines, one object a line (blank lines skipped); an invalid line is a RecipeError with its 1-based number."""
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{p}, line {n}: not valid JSON ({exc.msg} at column {exc.pos + 1}); data.source must "
                                  "be JSON Lines: one object per line") from None
            if not isinstance(row, dict):
                raise RecipeError(f"{p}, line {n}: a JSON {type(row).__name__}, not an object with a prompt field")
            yield f"{p}, line {n}", row


class PromptStream:
    """An endless, reproducible stream of rows; its position (rows drawn) is all a resume needs."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.cfg, self.seed, self.drawn = cfg, seed, 0
        self.task = synthetic_task(cfg)
        self._rows = None if self.task is not None else read_prompt_file(cfg.source, cfg.prompt_key)

    def row_at(self, i: int) -> dict:
        """Row i of the stream (group i's prompt), wherever the stream is."""
        if self.task is not None:
            return self.task.rows(1, seed=hash((self.seed, i)) & 0x7FFFFFFF)[0]
        assert self._rows is not None
        epoch, pos = divmod(i, len(self._rows))
        order = list(range(len(self._rows)))
        if self.cfg.shuffle:
            random.Random(hash((self.seed, epoch)) & 0x7FFFFFFF).shuffle(order)
        return dict(self._rows[order[pos]])

    def take(self, n: int) -> list[dict]:
        out = [self.row_at(self.drawn + k) for k in range(n)]
        self.drawn += n
        return out

    def seek(self, i: int) -> None:
        """Continue from row i (a resume)."""
        self.drawn = i

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.take(1)[0]


class PromptFormatter:
    """Row -> prompt text: the recipe's template over the row's fields, then optionally the chat template."""

    def __init__(self, cfg: DataConfig, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
            raise RecipeError("data.chat_template = true but the model's tokenizer has no chat template")

    def __call__(self, row: dict) -> str:
        text = row["prompt"]
        if self.cfg.template:
            fields = {**row, "prompt": text, self.cfg.prompt_key: text}
            try:
                text = self.cfg.template.format(**fields)
            except KeyError as exc:
                raise RecipeError(f"data.template names the field {exc} that rows do not have; they have: "
                                  f"{', '.join(sorted(fields))}") from None
        if self.cfg.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text


def row_to_json(row: dict) -> str:
    """The dataset fields of a row (all but the prompt) as JSON, as stored beside the sample."""
    return json.dumps({k: v for k, v in row.items() if k != "prompt"}, default=str)
