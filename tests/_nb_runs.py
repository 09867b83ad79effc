"""Small run directories for the notebook tests, written by the library's own writers.

The SEAL bench and the PonderTTT evaluation take minutes even on a tiny model (compilation
dominates), so their notebooks read outputs assembled here from the same functions the commands
use to write them (`seal.protocol.build_reply` + `seal.bench.summarize`; `ponder.evaluate`
`summarise` / `write_results` / `write_tables`), on small generated inputs. codeeval is cheap
and runs for real (`jaxttt codeeval` on a completions file, in the confined sandbox).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def seal_report(path: Path, *, passages: int = 3, seed: int = 0) -> dict:
    """A `seal-bench --out` report: the adapted model learns the founding year of every passage
    and, from the second passage on, its founder; the base model guesses nothing."""
    from jaxttt.seal import knowledge
    from jaxttt.seal.bench import summarize
    from jaxttt.seal.protocol import build_reply

    rows = []
    for i, item in enumerate(knowledge.make_knowledge_set(passages, seed)):
        answers = [q["answer"] for q in item["questions"]]
        adapted_ok = [i > 0, False, True]  # founder, town, year
        adapted = [a if ok else "I do not know" for a, ok in zip(answers, adapted_ok)]
        reply = build_reply(["I do not know"] * 3, [False] * 3, adapted, adapted_ok)
        first = 10.0 if i == 0 else 0.0  # the first request compiles
        timings = {"baseline_eval_s": 0.5 + first, "finetune_s": 2.0 + 0.1 * i + first,
                   "adapted_eval_s": 0.4 + first}
        timings["total_s"] = sum(timings.values())
        rows.append({"title": item["title"], "client_s": timings["total_s"] + 0.01, **reply,
                     "timings": timings})
    report = summarize(rows)
    report.update(passages=passages, seed=seed, hparams={"finetune_epochs": 1}, requests=rows)
    path.write_text(json.dumps(report, indent=1))
    return report


def _seed_tables(seed: int, chunks: int, rate: float) -> dict:
    """One seed's [C, A] loss table and every method's actions, from known per-chunk gains."""
    from jaxttt.ponder.evaluate import METHODS

    rng = np.random.default_rng(seed)
    gain = np.abs(rng.normal(0.05, 0.03, chunks))  # what UPDATE_1 saves on each chunk
    skip = 5.0 + rng.normal(0, 0.2, chunks)
    losses = np.stack([skip, skip - gain, skip - 1.02 * gain, skip - 1.01 * gain], -1)
    k = int(round(rate * chunks))
    top = np.zeros(chunks, np.int64)
    top[np.argsort(-gain)[:k]] = 1
    noisy = np.zeros(chunks, np.int64)
    noisy[np.argsort(-(gain + rng.normal(0, 0.03, chunks)))[:k]] = 1
    actions = {"SKIP": np.zeros(chunks, np.int64), "UPDATE_1": np.ones(chunks, np.int64),
               "UPDATE_2": np.full(chunks, 2), "UPDATE_4": np.full(chunks, 3),
               "random": (rng.random(chunks) < rate).astype(np.int64), "oracle": top,
               "oracle_best": losses.argmin(-1), "gated": noisy, "gated_lag1": np.roll(noisy, 1),
               "ppo": (rng.random(chunks) < rate).astype(np.int64),
               "ppo_lag1": (rng.random(chunks) < rate).astype(np.int64)}
    assert set(actions) == set(METHODS)
    flops = {"SKIP": 4.0e7, "UPDATE_1": 4.3e7, "UPDATE_2": 4.4e7, "UPDATE_4": 4.6e7,
             "ttt/SKIP": 2.0e6, "ttt/UPDATE_1": 5.0e6, "ttt/UPDATE_2": 6.0e6,
             "ttt/UPDATE_4": 8.0e6, "signal": 2.0e6, "features": 2.0e7}
    return {"actions": actions, "losses": losses, "executed_check": 0.0, "flops": flops}


def ponder_eval(out: Path, *, budgets=(1.5, 2.5), seeds: int = 2, chunks: int = 48) -> Path:
    """The layout of `ponder eval --budget 1.5 --budget 2.5 --seeds 2`: budget-<b>/results.json
    and tables.npz per budget."""
    from jaxttt import config as C
    from jaxttt.ponder import evaluate as E
    from jaxttt.ponder.config import PonderEvalConfig

    out.mkdir(parents=True)
    dims = dict(d_model=64, n_heads=2, d_head=32, mini_batch=8)
    for b in budgets:
        ecfg = C.load(PonderEvalConfig, None, [f"budget={b}", "bootstrap=50"])
        tables = [_seed_tables(s, chunks, ecfg.target_rate) for s in range(seeds)]
        where = out / f"budget-{b:g}"
        where.mkdir()
        E.write_tables(tables, where)
        E.write_results(E.summarise(tables, ecfg, ttt_dims=dims), where,
                        {"runs": [], "eval_config": C.to_dict(ecfg), "chunk_len": 32})
    return out


def codeeval_run(tmp: Path) -> Path:
    """`jaxttt codeeval` on 3 HumanEval tasks x 2 samples: the canonical solution and a wrong one
    (HumanEval/2 gets a crashing one instead)."""
    from jaxttt import cli
    from jaxttt.eval.humaneval import load_humaneval

    tasks = load_humaneval()
    rows = []
    for t in ("HumanEval/0", "HumanEval/2", "HumanEval/12"):
        wrong = "    raise ValueError('no')\n" if t == "HumanEval/2" else "    return None\n"
        rows += [{"task_id": t, "completion": tasks[t].canonical_solution},
                 {"task_id": t, "completion": wrong}]
    completions = tmp / "completions.jsonl"
    completions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "codeeval"
    rc = cli.main(["codeeval", "--bench", "humaneval", "--completions", str(completions),
                   "--k", "1", "2", "--timeout", "5", "--out", str(out), "--no-progress"])
    assert rc == 0, "jaxttt codeeval failed"
    return out
