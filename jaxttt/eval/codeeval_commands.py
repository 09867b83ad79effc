"""`jaxttt codeeval`: executable pass@k on HumanEval or MBPP.

    jaxttt codeeval --bench humaneval --completions F.jsonl --k 1 --out DIR
    jaxttt codeeval --bench humaneval --ckpt RUN --n 10 --temperature 0.8 --k 1 10 --out DIR

Writes DIR/samples.jsonl (one row per sample with its result, as they finish) and
DIR/summary.json; the last stdout line is one JSON object with pass@k for each k asked.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("codeeval", help="pass@k on HumanEval / MBPP with confined execution")
    p.add_argument("--bench", required=True, choices=("humaneval", "mbpp"))
    p.add_argument("--mbpp-file", default=None, help="local sanitized MBPP JSON (needed for mbpp)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--completions", default=None, help="JSONL of {task_id, completion}")
    src.add_argument("--ckpt", default=None, help="model run to sample completions from")
    p.add_argument("--n", type=int, default=1, help="samples per task (with --ckpt)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (with --ckpt)")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampler call")
    p.add_argument("--no-chat", action="store_true", help="raw prompts even if the tokenizer has a chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k for each k (k <= n)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids, or a number = the first N tasks")
    p.add_argument("--timeout", type=float, default=10.0, help="wall seconds per sample")
    p.add_argument("--memory-mb", type=int, default=512, help="address-space limit per sample")
    p.add_argument("--workers", type=int, default=None, help="parallel samples (default: CPU count)")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--unsafe-local-exec", action="store_true",
                   help="run model code WITHOUT kernel confinement where it is unavailable (trusted code only; logged)")
    p.set_defaults(func=_codeeval)


def _select(tasks: dict, spec: str | None) -> dict:
    from jaxttt.errors import UserError

    if not spec:
        return tasks
    if spec.isdigit():
        return dict(list(tasks.items())[:int(spec)])
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    missing = [i for i in ids if i not in tasks]
    if missing:
        raise UserError(f"--tasks: unknown task id {missing[0]!r} (ids look like {next(iter(tasks))!r})")
    return {i: tasks[i] for i in ids}


def _codeeval(args: argparse.Namespace) -> int:
    from jaxttt.errors import UserError
    from jaxttt.eval import codeeval, humaneval, sandbox
    from jaxttt.runs import JsonlWriter, fresh_run_dir

    for name in ("n", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be > 0")
    try:
        confined = sandbox.check_confinement(args.unsafe_local_exec)
    except sandbox.SandboxUnavailable as e:
        raise UserError(str(e)) from None
    try:
        tasks = _select(humaneval.load_benchmark(args.bench, args.mbpp_file), args.tasks)
    except humaneval.TaskError as e:
        raise UserError(str(e)) from None
    t0 = time.monotonic()
    info: dict = {}
    if args.completions:  # read before anything is created: a bad file leaves no directory
        samples = codeeval.read_completions(args.completions, tasks)
        codeeval.check_ks(samples, args.k)
        out = fresh_run_dir(args.out)
    else:
        out = fresh_run_dir(args.out)
        samples, info = codeeval.generate_completions(
            tasks, args.ckpt, n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, chat=False if args.no_chat else None,
            progress=not args.no_progress)
    ks = codeeval.check_ks(samples, args.k)
    limits = sandbox.Limits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    with JsonlWriter(out / "samples.jsonl") as writer:
        results = codeeval.evaluate_samples(tasks, samples, limits=limits, workers=args.workers,
                                            unsafe_local_exec=args.unsafe_local_exec, writer=writer,
                                            progress=not args.no_progress)
    summary = {"bench": args.bench, **codeeval.summarize(results, ks), "confined": confined,
               "unsafe_local_exec": bool(args.unsafe_local_exec), "timeout_s": args.timeout,
               "workers": args.workers or os.cpu_count(), "wall_s": round(time.monotonic() - t0, 2),
               **({"generation": info} if info else {}),
               **({"completions": str(args.completions)} if args.completions else {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("pass@")} |
                     {"n_tasks": summary["n_tasks"], "n_samples": summary["n_samples"],
                      "unsafe_local_exec": summary["unsafe_local_exec"]}), flush=True)
    return 0
