"""Built-in reward functions, named in a recipe as `rl.rewards:NAME` (`reward.fn`).

`arithmetic_exact` (the synthetic task), `MathAnswer` / `math_answer` (GSM8K '####' and \\boxed{} answers,
MATH-normalised, numbers compared exactly; strict or flexible about what counts as the answer,
`reward.answer_mode`), `RewardModel` (a sequence-classification model's score). A reward function of your
own takes a `Sample` (importable from here) and returns a float or a dict with `score`; how it is loaded and
called safely is `rl.core.scoring`.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from typing import Any

from rl.core.scoring import Sample  # what a reward function receives; users import it from here

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ built-in reward functions

def arithmetic_exact(sample: Sample) -> float:
    """1.0 when the response (stripped) equals the row's `answer`, else 0.0."""
    return float(sample.response.strip() == str(sample.row.get("answer", "")).strip())


# ---------------------------------------------------------------- math answers (GSM8K '####', MATH \boxed{})

ANSWER_MODES = ("strict", "flexible")
_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# strict '####' answer: '#### ', then a number (comma groups of three allowed) ending at whitespace or the end
_STRICT_HASH = re.compile(r"#### (-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?=\s|$)")
# flexible '####' answer: a leading number (after an optional $) that ends at a space or punctuation
_LEADING_NUMBER = re.compile(r"\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?)(?=$|\s|[.,;:!?)])")
_UNIT = re.compile(r"(.*?\S)\s*\\(?:text|mbox)\{\s*[A-Za-z][^{}]*\}(?:\^\{?\d\}?)?")  # '5\text{ cm}' -> '5'
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")
#: relative tolerance of a comparison in which either number is written as a decimal (integers and
#: fractions compare exactly): absorbs a recurring decimal written to about nine digits, nothing coarser
DECIMAL_REL_TOL = Fraction(1, 10**9)


def _last_boxed(text: str) -> tuple[int, str] | None:
    """Position and contents of the last \\boxed{...}, braces balanced."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return start, text[i:j]
    return None


def _last_hash(text: str, strict: bool) -> tuple[int, str] | None:
    """Position and text of the last '####' answer: strict, a number right after '#### '; flexible, what
    follows the last '####' on its line, whatever the spacing: its leading number if it starts with one
    ('$72.' -> 72, '72 clips' -> 72), else all of it."""
    if strict:
        found = list(_STRICT_HASH.finditer(text))
        return (found[-1].start(), found[-1].group(1)) if found else None
    pos = text.rfind("####")
    rest = text[pos + 4:].strip() if pos >= 0 else ""
    if not rest:
        return None
    line = rest.splitlines()[0]
    lead = _LEADING_NUMBER.match(line)
    return pos, lead.group(1) if lead else line


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """A math response's final answer: the later of its last \\boxed{} and its last '####' answer.

    strict: only these marked answers count, and '####' must be followed by one space and a number that
    ends at whitespace or the end of the text (verl's GSM8K rule): '#### 72', '#### 72 clips' and
    '#### 1,000' count; '####72', '#### 72.', '#### $72' do not. flexible accepts everything strict does,
    reads '####' loosely (see _last_hash), and scores a response with no marked answer on its last number.
    """
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {mode!r}; valid: {', '.join(ANSWER_MODES)}")
    marked = [m for m in (_last_boxed(text), _last_hash(text, mode == "strict")) if m is not None]
    if marked:
        return max(marked)[1]
    nums = _NUMBER.findall(text) if mode == "flexible" else []
    return nums[-1] if nums else None


def _latex_arg(s: str, k: int) -> tuple[str | None, int]:
    """The LaTeX argument starting at s[k] (a braced group, a command, or one character) and the index after it."""
    if k >= len(s):
        return None, k
    if s[k] == "{":
        depth = 0
        for j in range(k, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[k + 1:j], j + 1
        return None, k
    if s[k] == "\\":
        m = re.match(r"\\[A-Za-z]+", s[k:])
        return (m.group(0), k + m.end()) if m else (s[k:k + 2], k + 2)
    return s[k], k + 1


def _brace_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{x} -> \\frac{1}{x}: brace-less arguments are one token, as in LaTeX."""
    out, i = [], 0
    while (j := s.find("\\frac", i)) >= 0:
        out.append(s[i:j] + "\\frac")
        k = j + len("\\frac")
        for _ in range(2):
            arg, k = _latex_arg(s, k)
            if arg is None:
                break
            out.append("{" + _brace_fracs(arg) + "}")
        i = k
    return "".join(out) + s[i:]


def _drop_units(s: str) -> str:
    """Trailing \\text{ unit}s go ('5\\text{ cm}' -> '5'); any other \\text{x} becomes x."""
    while m := _UNIT.fullmatch(s):
        s = m.group(1)
    while (unwrapped := _TEXT.sub(r"\1", s)) != s:
        s = unwrapped
    return s


def normalize_answer(ans: str) -> str:
    """The MATH grader's normalisation (Hendrycks et al.), plus GSM8K's: drop what does not change an
    answer (spacing commands, \\left/\\right, $, %, degrees, units in \\text{}, thousands separators, a
    short left-hand side 'x = '), spell \\dfrac/\\tfrac as \\frac, brace \\frac12 and \\sqrt2, remove
    spaces, lowercase."""
    s = ans.strip().replace("\n", "")
    s = s.replace("{,}", "")
    for gone in ("\\!", "\\,", "\\;", "\\:", "\\left", "\\right", "^{\\circ}", "^\\circ", "°", "\\$", "$",
                 "\\%", "%"):
        s = s.replace(gone, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _drop_units(s.strip())
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1]
    s = s.replace(" ", "")
    s = re.sub(r"\\sqrt([^{\[\\])", r"\\sqrt{\1}", s)
    s = _brace_fracs(s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return s.rstrip(".").lower()


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, written as a decimal) of a normalised integer, decimal, a/b or \\frac{a}{b}, optionally
    negated; None for anything else."""
    neg, body = s.startswith("-"), s.removeprefix("-")
    num = r"-?(?:\d+(?:\.\d*)?|\.\d+)"
    m = re.fullmatch(rf"\\frac\{{({num})\}}\{{({num})\}}|({num})/({num})|({num[2:]})", body)
    if m is None:
        return None
    parts = [p for p in m.groups() if p is not None]
    if len(parts) == 2 and Fraction(parts[1]) == 0:
        return None
    value = Fraction(parts[0]) / (Fraction(parts[1]) if len(parts) == 2 else 1)
    return (-value if neg else value), any("." in p for p in parts)


def answers_match(got: str, truth: str) -> bool:
    """Whether two extracted answers are the same: as numbers when both are numbers (integers and
    fractions exactly; with a decimal on either side, within DECIMAL_REL_TOL), else as normalised strings."""
    a, b = normalize_answer(got), normalize_answer(truth)
    na, nb = _as_number(a), _as_number(b)
    if na is None or nb is None:
        return a == b
    (x, x_decimal), (y, y_decimal) = na, nb
    if x_decimal or y_decimal:
        return abs(x - y) <= DECIMAL_REL_TOL * max(abs(x), abs(y))
    return x == y


def math_answer(sample: Sample, mode: str = "strict") -> dict[str, float]:
    """1.0 when the response's final answer (see extract_answer for what `mode` accepts) matches the
    ground truth (answers_match). Ground truth: the row's `answer`, its '####' or \\boxed{} part if it has
    one. Also reports `has_answer`: whether the response had an answer that `mode` accepts. As a recipe's
    reward.fn this is strict; rl.rewards:MathAnswer reads the mode from reward.answer_mode."""
    truth_raw = str(sample.row.get("answer", ""))
    marked = "####" in truth_raw or _BOXED in truth_raw
    truth = extract_answer(truth_raw, "flexible") if marked else truth_raw
    got = extract_answer(sample.response, mode)
    if got is None or truth is None:
        return {"score": 0.0, "has_answer": float(got is not None)}
    return {"score": float(answers_match(got, truth)), "has_answer": 1.0}


class MathAnswer:
    """math_answer with the mode from the recipe's `reward.answer_mode` (strict | flexible); name it as
    `reward.fn=rl.rewards:MathAnswer`."""

    def __init__(self, cfg: Any) -> None:
        if cfg.answer_mode not in ANSWER_MODES:
            raise ValueError(f"reward.answer_mode = {cfg.answer_mode!r}; valid: {', '.join(ANSWER_MODES)}")
        self.mode = cfg.answer_mode

    def __call__(self, sample: Sample) -> dict[str, float]:
        return math_answer(sample, self.mode)


class RewardModel:
    """Scores `prompt + response` with a Hugging Face sequence-classification model (`reward.model_path`);
    the score is the first logit, or its sigmoid when `reward.model_sigmoid`. Name it as
    `reward.fn=rl.rewards:RewardModel`; each reward worker loads the model once."""

    def __init__(self, cfg: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not cfg.model_path:
            raise ValueError("reward.model_path is empty: point it at a sequence-classification model directory")
        self.tok = AutoTokenizer.from_pretrained(cfg.model_path)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(cfg.model_path).eval()
        self.sigmoid = cfg.model_sigmoid
        self.lock = __import__("threading").Lock()
        torch.set_num_threads(1)

    def __call__(self, samples: list[Sample] | Sample) -> list[float] | float:
        import torch

        batch = samples if isinstance(samples, list) else [samples]
        enc = self.tok([s.prompt + s.response for s in batch], return_tensors="pt", padding=True, truncation=True)
        with self.lock, torch.no_grad():
            logits = self.model(**enc).logits[:, 0].float()
        scores = (torch.sigmoid(logits) if self.sigmoid else logits).tolist()
        return scores if isinstance(samples, list) else scores[0]
