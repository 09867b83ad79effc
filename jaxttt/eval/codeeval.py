"""Executable pass@k on HumanEval / MBPP: completions in, confined execution, pass@k out.

`evaluate_samples` runs every (task, completion) pair through `sandbox.evaluate` (the
candidate confined in its own process, the benchmark's `check` in another) on a thread pool
(the work happens in child processes, so threads spread it over the cores), writing one
`samples.jsonl` row per sample as it finishes. A sample counts as correct only if the whole
test passes; `summarize` turns per-task counts into the unbiased pass@k of Chen et al.
`generate_completions` samples them from a checkpoint with the batched sampler.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from jaxttt.errors import UserError
from jaxttt.eval import sandbox
from jaxttt.eval.humaneval import CodeTask, extract_code, pass_at_k

# Where a base model's continuation of a function body ends (the HumanEval paper's stops).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one "
                    "```python code block.\n\n```python\n{prompt}```")


def read_completions(path: str | Path, tasks: dict[str, CodeTask]) -> list[dict]:
    """Rows {task_id, completion} of a JSONL file; any bad row is a UserError naming FILE:LINE."""
    from jaxttt.runs import read_jsonl

    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path}: no completions")
    out = []
    for i, row in enumerate(rows, 1):
        where = f"{path}: row {i}"
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) \
                or not isinstance(row.get("completion"), str):
            raise UserError(f"{where}: expected an object with string fields task_id and completion")
        if row["task_id"] not in tasks:
            raise UserError(f"{where}: unknown task_id {row['task_id']!r} "
                            f"(ids look like {next(iter(tasks))!r})")
        out.append({"task_id": row["task_id"], "completion": row["completion"]})
    return out


def check_ks(samples: list[dict], ks: Iterable[int]) -> list[int]:
    """The requested k values, each at most the smallest number of samples of any task."""
    counts: dict[str, int] = {}
    for s in samples:
        counts[s["task_id"]] = counts.get(s["task_id"], 0) + 1
    n_min = min(counts.values())
    ks = sorted(set(int(k) for k in ks))
    bad = [k for k in ks if not 1 <= k <= n_min]
    if bad:
        raise UserError(f"--k {bad[0]}: pass@k needs 1 <= k <= n, and the smallest number of "
                        f"samples of a task is {n_min}")
    return ks


def _run_one(task: CodeTask, completion: str, limits: sandbox.Limits, unsafe: bool) -> dict:
    r = sandbox.evaluate(task.program(completion), limits=limits, unsafe_local_exec=unsafe,
                         **task.tests(split=False))
    return {"passed": r.all_passed, "error": r.error, "timed_out": r.timed_out,
            "wall_s": round(r.wall_s, 4), "confined": r.confined}


def evaluate_samples(tasks: dict[str, CodeTask], samples: list[dict], *, limits: sandbox.Limits,
                     workers: int | None = None, unsafe_local_exec: bool = False,
                     writer=None, progress: bool = True) -> list[dict]:
    """Each sample with its result (in input order); rows also go to `writer` as they finish."""
    sandbox.check_confinement(unsafe_local_exec)  # refuse before starting anything
    workers = workers or os.cpu_count() or 1
    results: list[dict | None] = [None] * len(samples)
    bar = _progress(len(samples), progress)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_one, tasks[s["task_id"]], s["completion"], limits,
                               unsafe_local_exec): i for i, s in enumerate(samples)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            results[i] = {**samples[i], **fut.result()}
            if writer is not None:
                writer.write(results[i])
            bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="codeeval", unit="sample", file=sys.stderr, disable=not enabled,
                mininterval=1.0)


def summarize(results: list[dict], ks: list[int]) -> dict:
    """pass@k averaged over tasks (unbiased estimator), plus counts."""
    per_task: dict[str, list[int]] = {}
    for r in results:
        n_c = per_task.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(r["passed"])
    out = {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in per_task.values()) / len(per_task)
           for k in ks}
    out.update(n_tasks=len(per_task), n_samples=len(results),
               n_passed=sum(bool(r["passed"]) for r in results),
               n_timed_out=sum(bool(r["timed_out"]) for r in results))
    return out


# ---- generation ---------------------------------------------------------------------------------
def truncate_at_stop(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def completion_from_output(task: CodeTask, text: str, chat: bool) -> str:
    """What to append to the prompt (HumanEval) / the program (MBPP) for a model output."""
    if chat or not task.completion_style:
        code = extract_code(text)
        return ("\n" + code) if task.completion_style else code  # redefines the prompt's stub
    return truncate_at_stop(text)


def _prompt_ids(tok, task: CodeTask, chat: bool) -> list[int]:
    if chat:
        return tok.chat_ids([{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=task.prompt)}])
    return tok.prompt_ids(task.prompt)


def generate_completions(tasks: dict[str, CodeTask], ckpt: str, *, n: int, temperature: float,
                         max_new_tokens: int = 384, batch_size: int = 16, seed: int = 0,
                         chat: bool | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """n samples per task from checkpoint `ckpt` (`jaxttt.runs.load_run` spec), batched; the
    chat template is used when the tokenizer has one (instruct models) unless `chat=False`.
    Returns (samples, info)."""
    import jax

    from jaxttt.runs import load_run
    from jaxttt.sampling import generate

    model, tok, meta = load_run(ckpt)
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    room = model.cfg.max_seq_len - max_new_tokens  # prompt tokens that fit
    if room < 8:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"model's max_seq_len={model.cfg.max_seq_len}")
    jobs = [(tid, j) for tid in tasks for j in range(n)]
    prompts = {tid: _prompt_ids(tok, t, use_chat) for tid, t in tasks.items()}
    truncated = sum(len(p) > room for p in prompts.values())
    prompts = {tid: p[-room:] for tid, p in prompts.items()}  # keep the end: where the body starts
    key = jax.random.key(seed)
    samples, bar = [], _progress(len(jobs), progress)
    t0 = time.monotonic()
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        key, sub = jax.random.split(key)
        out = generate(model, [prompts[tid] for tid, _ in batch], sub, max_new_tokens=max_new_tokens,
                       temperature=max(temperature, 1e-6), greedy=temperature <= 0,
                       eos_id=tok.eos_id, pad_id=tok.pad_id)
        for (tid, _), ids, length in zip(batch, out.tokens, out.lengths):
            text = tok.decode(ids[:length])
            samples.append({"task_id": tid, "completion": completion_from_output(tasks[tid], text, use_chat),
                            "raw": text})
        bar.update(len(batch))
    bar.close()
    info = {"ckpt": str(ckpt), "chat": use_chat, "n": n, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "generate_s": round(time.monotonic() - t0, 2),
            "step": meta.get("step"), "prompts_truncated": truncated}
    return samples, info
