"""Built-in discovery environments (handoff G2 reward patterns).

- `toy`:     hidden-string guessing, partial credit per matching character (handoff toy env).
- `numeric`: a hidden vector y*; reward exp(-alpha ||y - y*||^2) (pattern 3); actions are
             numbers or arithmetic expressions parsed with `ast` (never eval).
- `code`:    write a Python function; reward = fraction of unit tests passed in the sandbox
             (pattern 2).
- `humaneval:HumanEval/12`, `mbpp:Mbpp/2`: a real benchmark problem; reward = fraction of the
             task's asserts passed (HumanEval's `check` split into its asserts).
- `gsm8k`:   one grade-school math problem from a local JSONL (`question`, `answer` ending in
             `#### <number>`); reward 1 if correct, small format credit otherwise (pattern 1).

Prompts are short and deterministic; each ends where the model's continuation (the action)
should start.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from jaxttt.discover.env import DiscoveryEnv, EnvError, InvalidAction
from jaxttt.eval import humaneval, sandbox
from jaxttt.eval.humaneval import extract_code  # noqa: F401 - part of this module's interface

if TYPE_CHECKING:
    from jaxttt.discover.archive import Archive


def _first_line(action: str) -> str:
    for line in action.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _known_reward(state: str, archive: Archive | None) -> float | None:
    node = archive.lookup(state) if archive is not None else None
    return None if node is None else node.reward


# --------------------------------------------------------------------------------------------
# Toy string match
# --------------------------------------------------------------------------------------------
class ToyStringEnv(DiscoveryEnv):
    """Guess a hidden string. Reward = matching positions / max(len(target), len(guess)),
    so only the exact string scores 1 and extra characters cost credit."""

    version = "toy-1"

    def __init__(self, *, target: str = "HELLO", initial: str = ""):
        super().__init__(target=target, initial=initial)
        if not target:
            raise EnvError("toy env: target must be a non-empty string")
        self.target = target
        self.initial = initial

    def problem_description(self) -> str:
        return f"Guess the hidden string of {len(self.target)} characters."

    def initial_state(self) -> str:
        return self.initial

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        lines = [self.problem_description()]
        if state:
            r = _known_reward(state, archive)
            lines += [f"Guess: {state}", f"Score: {r if r is not None else self.reward(state):.2f}"]
        return "\n".join(lines) + "\nGuess:"

    def transition(self, action: str) -> str:
        return _first_line(action)

    def reward(self, state: str) -> float:
        if not state:
            return 0.0
        matches = sum(a == b for a, b in zip(state, self.target))
        return matches / max(len(self.target), len(state))


# --------------------------------------------------------------------------------------------
# Numeric target
# --------------------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.Pow: math.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval_number(node: ast.AST) -> float:
    """Evaluate +, -, *, /, ** over int/float literals in float arithmetic; anything else raises."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)  # a huge int literal raises OverflowError here
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_number(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval_number(node.left), _eval_number(node.right))
    raise ValueError(f"not an arithmetic expression: {type(node).__name__}")


def parse_numbers(text: str, *, max_chars: int = 256) -> list[float] | None:
    """Numbers from `1.5, 2*3, -(4/2)`, `[1, 2]` or `1 2 3`; None if anything is not plain
    arithmetic on numeric literals (names, calls, attributes, strings...) or not finite."""
    text = text.strip()
    if not text or len(text) > max_chars:
        return None
    try:
        try:
            body = ast.parse(text, mode="eval").body
            items = body.elts if isinstance(body, (ast.Tuple, ast.List)) else [body]
        except SyntaxError:
            items = [ast.parse(tok, mode="eval").body for tok in text.split()]
        values = [_eval_number(item) for item in items]
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return values


def format_numbers(values: Sequence[float]) -> str:
    return ", ".join(format(v, ".6g") for v in values)


class NumericTargetEnv(DiscoveryEnv):
    """Find a hidden vector y*. State = canonical "a, b, c"; reward exp(-alpha ||y - y*||^2)."""

    version = "numeric-1"

    def __init__(self, *, target: Sequence[float] = (3.0, -1.0, 2.5), alpha: float = 0.5,
                 max_chars: int = 256):
        super().__init__(target=list(target), alpha=alpha, max_chars=max_chars)
        self.target = [float(t) for t in target]
        if not self.target or alpha <= 0:
            raise EnvError("numeric env: target must be non-empty and alpha > 0")
        self.alpha = float(alpha)
        self.max_chars = max_chars

    def problem_description(self) -> str:
        d = len(self.target)
        return f"Find the hidden vector of {d} numbers. Answer with {d} comma-separated numbers."

    def initial_state(self) -> str:
        return format_numbers([0.0] * len(self.target))

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        r = _known_reward(state, archive)
        score = r if r is not None else self.reward(state)
        return f"{self.problem_description()}\nAnswer: {state}\nScore: {score:.4f}\nAnswer:"

    def transition(self, action: str) -> str:
        values = parse_numbers(_first_line(action), max_chars=self.max_chars)
        if values is None or len(values) != len(self.target):
            return ""
        return format_numbers(values)

    def reward(self, state: str) -> float:
        values = parse_numbers(state, max_chars=self.max_chars)
        if values is None or len(values) != len(self.target):
            return 0.0
        sq = sum((y - t) * (y - t) for y, t in zip(values, self.target))  # inf, not OverflowError
        return math.exp(-self.alpha * sq) if math.isfinite(sq) else 0.0


# --------------------------------------------------------------------------------------------
# Code with unit tests
# --------------------------------------------------------------------------------------------
DEFAULT_CODE_PROBLEM = {
    "description": ("Write a Python function rle(s) that run-length encodes a string: each run of "
                    "a repeated character becomes the character followed by the run length, "
                    "e.g. rle('aaabcc') == 'a3b1c2'."),
    "tests": [
        "assert rle('') == ''",
        "assert rle('a') == 'a1'",
        "assert rle('aaabcc') == 'a3b1c2'",
        "assert rle('abab') == 'a1b1a1b1'",
        "assert rle('x' * 12) == 'x12'",
        "assert type(rle('zz')) is str and rle('zz') == 'z2'",
    ],
    "initial": "def rle(s):\n    raise NotImplementedError\n",
}


def checked_program(code: str) -> str:
    """`code` if it is a Python program; else InvalidAction saying why (no code, or the
    syntax error and its line). Compiling parses the candidate; it never runs it."""
    if not code.strip():
        raise InvalidAction("no code in the action")
    try:
        compile(code, "<candidate>", "exec", dont_inherit=True)
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        raise InvalidAction(f"{where}{type(e).__name__}: {e.msg}"[:300]) from None
    except (ValueError, RecursionError, MemoryError) as e:  # NUL bytes; nesting past the parser
        raise InvalidAction(f"not a Python program: {type(e).__name__}: {e}"[:300]) from None
    return code


def _require_sandbox(unsafe_local_exec: bool) -> None:
    try:
        sandbox.check_confinement(unsafe_local_exec)
    except sandbox.SandboxUnavailable as e:
        raise EnvError(f"code env: {e}") from None


class CodeTestsEnv(DiscoveryEnv):
    """Reward = fraction of `tests` (assert snippets) passed by the candidate. The candidate runs
    confined in its own process; the asserts run in another, calling it through proxies
    (`jaxttt.eval.sandbox`). Tests see the candidate's functions and plain-data globals, not
    its imports or objects: a test imports what it uses and compares plain values.
    `unsafe_local_exec` runs it unconfined where the kernel cannot confine (logged; the option
    is recorded with the run's env options)."""

    version = "code-2"

    def __init__(self, *, description: str | None = None, tests: Sequence[str] | None = None,
                 initial: str | None = None, timeout_s: float = 5.0, memory_mb: int = 256,
                 unsafe_local_exec: bool = False):
        super().__init__(description=description, tests=tests, initial=initial,
                         timeout_s=timeout_s, memory_mb=memory_mb, unsafe_local_exec=unsafe_local_exec)
        if (description is None) != (tests is None):
            raise EnvError("code env: give description and tests together (or neither: the "
                           "built-in rle problem)")
        problem = DEFAULT_CODE_PROBLEM if description is None else {
            "description": description, "tests": tests, "initial": ""}
        self.description, self.tests = problem["description"], list(problem["tests"])
        self.initial = initial if initial is not None else problem["initial"]
        if not self.tests:
            raise EnvError("code env: at least one test is required")
        self.limits = sandbox.Limits(timeout_s=timeout_s, memory_mb=memory_mb)
        self.unsafe_local_exec = bool(unsafe_local_exec)
        _require_sandbox(self.unsafe_local_exec)

    def problem_description(self) -> str:
        return self.description

    def initial_state(self) -> str:
        return self.initial

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        parts = [self.description]
        if state:
            r, total = _known_reward(state, archive), len(self.tests)
            passed = f" (passes {round(r * total)}/{total} tests)" if r is not None else ""
            parts.append(f"Current solution{passed}:\n```python\n{state.rstrip()}\n```")
        parts.append("Improved solution:\n```python\n")
        return "\n".join(parts)

    def transition(self, action: str) -> str:
        return checked_program(extract_code(action))

    def _evaluate(self, state: str) -> sandbox.TestsResult:
        return sandbox.evaluate(state, self.tests, limits=self.limits,
                                unsafe_local_exec=self.unsafe_local_exec)

    def reward(self, state: str) -> float:
        if not state.strip():
            return 0.0
        return self._evaluate(state).fraction


class _BenchmarkEnv(CodeTestsEnv):
    """One benchmark task; the state is the candidate's full program."""

    bench = ""

    def __init__(self, *, task_id: str, path: str | None = None, timeout_s: float = 6.0,
                 memory_mb: int = 256, unsafe_local_exec: bool = False):
        try:
            self.task = humaneval.load_task(self.bench, task_id, path)
        except humaneval.TaskError as e:
            raise EnvError(f"{self.bench} env: {e}") from None
        kwargs = self.task.tests(split=True)
        super().__init__(description=self.task.prompt, tests=kwargs.pop("tests"), initial="",
                         timeout_s=timeout_s, memory_mb=memory_mb, unsafe_local_exec=unsafe_local_exec)
        self.options = {"task_id": task_id, "path": path, "timeout_s": timeout_s,
                        "memory_mb": memory_mb, "unsafe_local_exec": unsafe_local_exec}
        self.test_kwargs = kwargs

    @classmethod
    def spec_options(cls, tail: str) -> dict:
        """`humaneval:HumanEval/12` (or `humaneval:12`) -> {"task_id": ...}."""
        return {"task_id": tail.strip()}

    def problem_description(self) -> str:
        return f"{self.task.task_id}\n{self.task.prompt}"

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        parts = ["Complete the Python function below.", f"```python\n{self.task.prompt.rstrip()}\n```"]
        if state:
            r, total = _known_reward(state, archive), len(self.tests)
            passed = f" (passes {round(r * total)}/{total} tests)" if r is not None else ""
            parts.append(f"Current solution{passed}:\n```python\n{state.rstrip()}\n```")
        parts.append("Improved solution:\n```python\n")
        return "\n".join(parts)

    def transition(self, action: str) -> str:
        code = extract_code(action)
        if code.strip() and self.task.completion_style and f"def {self.task.entry_point}" not in code:
            code = self.task.program(code)  # a continuation of the prompt's body
        return checked_program(code)

    def _evaluate(self, state: str) -> sandbox.TestsResult:
        return sandbox.evaluate(state, self.tests, limits=self.limits,
                                unsafe_local_exec=self.unsafe_local_exec, **self.test_kwargs)


class HumanEvalEnv(_BenchmarkEnv):
    """`humaneval:HumanEval/12`: reward = fraction of the task's `check` asserts passed."""

    version = "humaneval-1"
    bench = "humaneval"


class MbppEnv(_BenchmarkEnv):
    """`mbpp:Mbpp/2` with option `path` (sanitized MBPP JSON): reward = fraction of asserts passed."""

    version = "mbpp-1"
    bench = "mbpp"


# --------------------------------------------------------------------------------------------
# GSM8K-style math
# --------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_MARKER = re.compile(r"####[ \t]*([^\n]*)")

DEFAULT_GSM8K = [
    {"question": "A baker made 24 muffins in the morning and 18 in the afternoon. She sold 35 "
                 "muffins. How many muffins are left?",
     "answer": "She made 24 + 18 = 42 muffins. 42 - 35 = 7 are left.\n#### 7"},
    {"question": "Tom reads 12 pages every day. How many pages does he read in 3 weeks?",
     "answer": "3 weeks is 3 * 7 = 21 days. 12 * 21 = 252 pages.\n#### 252"},
    {"question": "Pens cost $3 each. Maria buys 4 pens and pays with a $20 bill. How much change "
                 "does she get?",
     "answer": "4 pens cost 4 * 3 = 12 dollars. 20 - 12 = 8.\n#### 8"},
    {"question": "A school has 1,150 students. Each year 85 more students join. How many students "
                 "will it have after 2 years?",
     "answer": "2 * 85 = 170 new students. 1150 + 170 = 1320.\n#### 1,320"},
]


def _to_number(token: str) -> float | None:
    cleaned = token.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_final_answer(text: str) -> tuple[float | None, bool]:
    """(answer, used_marker): the number right after the last `####`, else the last number in
    the text. Commas and `$` are ignored (`#### 1,234` -> 1234)."""
    markers = _MARKER.findall(text)
    if markers:
        m = _NUMBER.match(markers[-1].strip())
        if m is not None:
            return _to_number(m.group(0)), True
    numbers = _NUMBER.findall(text)
    return (_to_number(numbers[-1]) if numbers else None), False


def load_gsm8k(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EnvError(f"{path}:{lineno}: expected a JSON object with question and "
                               f"answer ({e})") from e
    return rows


class GSM8KEnv(DiscoveryEnv):
    """One GSM8K problem. State = the model's worked answer (trimmed). Reward: 1.0 if the final
    answer equals the gold one, `format_credit` if it is wrong but given as `#### <number>`,
    else 0."""

    version = "gsm8k-1"
    INSTRUCTION = ("Solve the problem. Show your reasoning, then give the final answer on its own "
                   "line as '#### <number>'.")

    def __init__(self, *, path: str | None = None, index: int = 0, format_credit: float = 0.1,
                 max_chars: int = 4000):
        super().__init__(path=path, index=index, format_credit=format_credit, max_chars=max_chars)
        if path is not None and not Path(path).is_file():
            raise EnvError(f"gsm8k env: no such file {path!r}")
        rows = load_gsm8k(path) if path is not None else DEFAULT_GSM8K
        if not 0 <= index < len(rows):
            raise EnvError(f"gsm8k env: index {index} out of range (0..{len(rows) - 1})")
        self.question = rows[index]["question"]
        gold, _ = parse_final_answer(rows[index]["answer"])
        if gold is None:
            raise EnvError(f"gsm8k env: problem {index} has no numeric answer")
        self.gold = gold
        self.format_credit, self.max_chars = float(format_credit), max_chars

    def problem_description(self) -> str:
        return self.question

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        lines = [self.INSTRUCTION, f"Question: {self.question}"]
        if state:
            r = _known_reward(state, archive)
            score = f" (reward {r:.2f})" if r is not None else ""
            lines.append(f"Previous answer{score}:\n{state}")
        return "\n".join(lines) + "\nAnswer:"

    def transition(self, action: str) -> str:
        # A continuation that starts inventing the next question is cut there.
        text = re.split(r"\n\s*Question:", action, maxsplit=1)[0]
        return text.strip()[: self.max_chars]

    def reward(self, state: str) -> float:
        answer, used_marker = parse_final_answer(state)
        if answer is None:
            return 0.0
        if math.isclose(answer, self.gold, rel_tol=1e-9, abs_tol=1e-9):
            return 1.0
        return self.format_credit if used_marker else 0.0
