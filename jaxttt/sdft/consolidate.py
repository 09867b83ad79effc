"""TTT-Discover -> SDFT consolidation (handoff Phase 11, decision E, G5, blueprint §3).

Each discovery run directory holds `discovery_log.jsonl`, one G5 record per line:
    {"problem_id", "prompt", "action", "state", "reward", "timestamp", "env_version", ...}
`discoveries_to_sdft` keeps records with reward >= min_reward, drops duplicates (same problem
and the same demonstration text after whitespace normalisation, keeping the higher reward),
keeps the best (or top-k) per problem, and writes SDFT JSONL:
    {"prompt", "demonstration", "problem_id", "reward", "source"}
where the demonstration is the parsed state (default; the action when the state is empty)
or the raw action, and `source` is `<log file>:<line>`.

`consolidate` then runs gated SDFT from the *base* checkpoint only: the test-time LoRA
adapters saved next to the logs are never read, let alone merged (handoff decision E.4).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from jaxttt.config import SDFTConfig
from jaxttt.sdft.data import Example, write_jsonl

LOG_FILE = "discovery_log.jsonl"
DATASET_FILE = "from_ttt.jsonl"
STATS_FILE = "consolidation.json"
REQUIRED = ("problem_id", "prompt", "action", "state", "reward", "timestamp", "env_version")
DEMO_FIELDS = ("state", "action")


def log_path(run_dir: str | Path) -> Path:
    """A run directory's discovery log (a path to the log file itself is accepted too)."""
    p = Path(run_dir)
    path = p if p.is_file() else p / LOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {LOG_FILE} (expected a TTT-Discover run directory)")
    return path


def normalise(text: str) -> str:
    """Whitespace-insensitive form used for de-duplication."""
    return re.sub(r"\s+", " ", text).strip()


def _parse(line: str, where: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object (G5 discovery record)")
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))} "
                         f"(G5 records need {', '.join(REQUIRED)})")
    for key in ("problem_id", "prompt", "action"):
        if not isinstance(rec[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {type(rec[key]).__name__}")
    r = rec["reward"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise ValueError(f"{where}: key 'reward' must be a finite number, got {r!r}")
    return rec


def read_log(path: Path, *, skip_bad: bool = False) -> Iterator[tuple[dict, str]]:
    """(record, "<file>:<line>") for each non-blank line; bad lines raise (or are skipped)."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield _parse(line, where), where
            except ValueError:
                if not skip_bad:
                    raise
                yield {}, where


def demonstration_text(rec: dict, field: str) -> str:
    """The demonstration of a record: its state (JSON-encoded if not a string) or its action."""
    value = rec[field]
    if field == "state" and (value is None or value == ""):
        value = rec["action"]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def discoveries_to_sdft(run_dirs: Sequence[str | Path], out_jsonl: str | Path, *,
                        min_reward: float, best_per_problem: bool = True,
                        top_k: int | None = None, demonstration: str = "state",
                        skip_bad: bool = False) -> dict[str, Any]:
    """Convert discovery logs to SDFT JSONL; returns counts (rows, kept, filtered, ...).

    `best_per_problem` keeps one example per problem; otherwise `top_k` per problem
    (None = every distinct demonstration above the threshold).
    """
    if demonstration not in DEMO_FIELDS:
        raise ValueError(f"demonstration must be one of {DEMO_FIELDS}, got {demonstration!r}")
    k = 1 if best_per_problem else top_k
    stats = {"runs": len(run_dirs), "rows": 0, "bad": 0, "below_threshold": 0, "empty": 0,
             "duplicates": 0}
    best: dict[tuple[str, str], Example] = {}  # (problem, normalised demo) -> best example
    for run in run_dirs:
        for rec, where in read_log(log_path(run), skip_bad=skip_bad):
            stats["rows"] += 1
            _offer(rec, where, best, stats, min_reward, demonstration)
    kept = _top_per_problem(best.values(), k)
    write_jsonl(out_jsonl, kept)
    stats.update(kept=len(kept), problems=len({e.meta["problem_id"] for e in kept}),
                 min_reward=min_reward, out=str(out_jsonl), demonstration=demonstration,
                 per_problem=k)
    return stats


def _offer(rec: dict, where: str, best: dict, stats: dict, min_reward: float, field: str) -> None:
    """Count `rec` and keep it if it is the best so far for its (problem, demonstration)."""
    if not rec:
        stats["bad"] += 1
        return
    if rec["reward"] < min_reward:
        stats["below_threshold"] += 1
        return
    demo = demonstration_text(rec, field)
    if not demo.strip():
        stats["empty"] += 1
        return
    key = (rec["problem_id"], normalise(demo))
    ex = Example(prompt=rec["prompt"], demonstration=demo,
                 meta={"problem_id": rec["problem_id"], "reward": float(rec["reward"]),
                       "source": where})
    if key in best:
        stats["duplicates"] += 1
        if ex.meta["reward"] <= best[key].meta["reward"]:
            return
    best[key] = ex


def _top_per_problem(examples, k: int | None) -> list[Example]:
    """Highest rewards first within each problem (stable: earlier records win ties)."""
    by_problem: dict[str, list[Example]] = {}
    for ex in examples:
        by_problem.setdefault(ex.meta["problem_id"], []).append(ex)
    out = []
    for pid in sorted(by_problem):
        ranked = sorted(by_problem[pid], key=lambda e: -e.meta["reward"])
        out.extend(ranked if k is None else ranked[:k])
    return out


def consolidate(run_dirs: Sequence[str | Path], ckpt: str | Path, out_dir: str | Path,
                cfg: SDFTConfig, *, min_reward: float, best_per_problem: bool = True,
                top_k: int | None = None, demonstration: str = "state", skip_bad: bool = False,
                **sdft_kwargs) -> dict[str, Any]:
    """Discovery logs -> OUT/from_ttt.jsonl -> gated SDFT of the base `ckpt` into OUT.

    Only `ckpt` (a plain model run) is loaded; the discovery runs contribute their logs only.
    `sdft_kwargs` go to `run_sdft` (tokenizer, mesh, replay_sources, progress).
    With several processes each builds the same dataset from the same logs: process 0 into
    OUT, the others into a private temporary file (OUT holds one copy, written once).
    """
    from jaxttt.sdft.loop import barrier, is_main, run_sdft, write_json
    from jaxttt.runs import fresh_run_dir

    out = fresh_run_dir(out_dir)
    barrier("run_dir")  # every process has checked it before process 0 writes into it
    with tempfile.TemporaryDirectory(prefix="jaxttt-consolidate-") as tmp:
        data = (out if is_main() else Path(tmp)) / DATASET_FILE
        stats = discoveries_to_sdft(run_dirs, data, min_reward=min_reward,
                                    best_per_problem=best_per_problem, top_k=top_k,
                                    demonstration=demonstration, skip_bad=skip_bad)
        stats["runs"] = [str(Path(r).absolute()) for r in run_dirs]
        write_json(out / STATS_FILE, stats)
        if stats["kept"] == 0:
            raise ValueError(f"no discovery with reward >= {min_reward} in {len(run_dirs)} run(s) "
                             f"({stats['rows']} rows read); nothing to consolidate "
                             f"(see {out / STATS_FILE})")
        summary = run_sdft(ckpt, data, out, cfg, keep_files=(DATASET_FILE, STATS_FILE),
                           **sdft_kwargs)
    summary["consolidation"] = stats
    write_json(out / "summary.json", summary)
    return summary
