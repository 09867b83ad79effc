"""`jaxttt eval`: held-out perplexity + probes of a run's model, plus what the run recorded.

Whatever the run type left behind is added to the report: the gate history of an SDFT run
(block_*/gate_decision.json, summary.json), the consolidation stats of a consolidate run,
and the result / best logged reward of a TTT-Discover run (result.json, discovery_log.jsonl).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from jaxttt.config import EvalConfig

_EVAL = EvalConfig()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run: perplexity, probes, run history")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--ckpt", default=None,
                   help="model run to evaluate (default: --run itself, e.g. the base of a discover run)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's)")
    p.add_argument("--heldout", default=_EVAL.heldout,
                   help="packed .bin (default: the default corpus's val split, run's tokenizer)")
    p.add_argument("--probes", default=_EVAL.probes, help="probe YAML ('' = none)")
    p.add_argument("--seq-len", type=int, default=_EVAL.seq_len)
    p.add_argument("--windows", type=int, default=_EVAL.windows, help="held-out windows scored")
    p.add_argument("--batch-size", type=int, default=_EVAL.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=_EVAL.max_new_tokens,
                   help="greedy tokens per probe")
    p.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    p.set_defaults(func=_eval)


# ---------------------------------------------------------------------------------------------
# Run history
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    from jaxttt.errors import UserError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def discovery_log_stats(path: Path) -> dict[str, Any]:
    """Rows, problems and best reward of a discovery_log.jsonl (unparseable lines counted)."""
    rows = bad = 0
    best: float | None = None
    problems: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rows += 1
        try:
            rec = json.loads(line)
            r = float(rec["reward"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        problems.add(str(rec.get("problem_id")))
        if math.isfinite(r) and (best is None or r > best):
            best = r
    return {"rows": rows, "bad_rows": bad, "problems": len(problems), "best_reward": best}


def run_history(run_dir: str | Path) -> dict[str, Any]:
    """What an SDFT / consolidate / discover run recorded, keyed by kind (empty if nothing)."""
    run = Path(run_dir)
    out: dict[str, Any] = {}
    gates = sorted(run.glob("block_*/gate_decision.json"))
    if gates:
        out["gates"] = [{"block": p.parent.name, **_read_json(p)} for p in gates]
    for name, key in (("summary.json", "summary"), ("consolidation.json", "consolidation"),
                      ("result.json", "discover_result")):
        if (run / name).is_file():
            out[key] = _read_json(run / name)
    if (run / "discovery_log.jsonl").is_file():
        out["discovery_log"] = discovery_log_stats(run / "discovery_log.jsonl")
    if isinstance(out.get("discover_result"), dict):  # scalars only (no archive dump)
        out["discover_result"] = {k: v for k, v in out["discover_result"].items()
                                  if not isinstance(v, (dict, list))}
    if isinstance(out.get("summary"), dict):  # keep the report small: no nested eval dumps
        out["summary"] = {k: v for k, v in out["summary"].items()
                          if k not in ("eval_initial", "eval_final", "gates")}
    return out


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------
def _model_source(args) -> str | None:
    from jaxttt.train.checkpoint import CheckpointError, find_run_dir

    if args.ckpt:
        return args.ckpt
    try:
        find_run_dir(args.run)
        return args.run
    except CheckpointError:
        return None


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    from jaxttt import config as C
    from jaxttt.errors import UserError
    from jaxttt.eval.report import evaluate_config
    from jaxttt.runs import load_run

    flags = {"heldout": args.heldout, "probes": args.probes, "seq_len": args.seq_len,
             "windows": args.windows, "batch_size": args.batch_size,
             "max_new_tokens": args.max_new_tokens}
    cfg = C.load(C.EvalConfig, None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                     for k, v in flags.items()])

    if not Path(args.run).is_dir():
        raise UserError(f"{args.run}: no such run directory")
    report: dict[str, Any] = {"run": str(Path(args.run).absolute())}
    report.update(run_history(args.run))
    src = _model_source(args)
    if src is None:
        if len(report) == 1:
            raise UserError(f"{args.run}: neither a model run (model.yaml + checkpoints/) nor a "
                            "run with results; pass --ckpt to evaluate a model")
        report["model"] = None
        report["note"] = "no model evaluated: --run is not a model run (pass --ckpt BASE)"
        return report
    model, tok, meta = load_run(src, step=args.step, tokenizer=args.tokenizer)
    report["model"] = {"ckpt": str(Path(src).absolute()), "step": meta.get("step"),
                       "kind": meta.get("kind", "pretrain")}
    report["eval"] = evaluate_config(model, tok, cfg)
    return report


def _eval(args: argparse.Namespace) -> None:
    report = build_report(args)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        ev = report.get("eval", {})
        print(f"wrote {args.out}: perplexity={ev.get('perplexity')} "
              f"probe/overall={ev.get('probe/overall')}")
    else:
        print(text)
