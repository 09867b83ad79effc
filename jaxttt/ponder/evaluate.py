"""`ponder eval`: every method on the same held-out chunks, over seeds -> results.json + Pareto plot.

Per seed (one `ponder train` run each, or one run with disjoint held-out blocks per seed):
score every chunk under every action (ChunkRunner.score), compute each method's actions, and
read its loss per chunk. Methods: SKIP, UPDATE_1/2/4, random (the gate's action at the target
rate), oracle (greedy top-rate chunks by realised gain, same action), oracle_best (each chunk's
best action: a bound), gated / gated_lag1 (reconstruction threshold + PID rate control), ppo /
ppo_lag1 (PPO + PID-Lagrangian at the same mean nominal budget). The gate's actions are also
re-run through the per-action programs (ChunkRunner.run, SKIP rows never enter an update
program) and checked against the table.
"""
from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import numpy as np

from jaxttt import config as C
from jaxttt.ponder import policies as P
from jaxttt.ponder import stats
from jaxttt.ponder.actions import ChunkRunner, analytic_ttt_flops
from jaxttt.ponder.config import ACTIONS, NOMINAL_COST, STEPS, PonderEvalConfig, PonderTrainConfig
from jaxttt.ponder.data import consecutive_chunks, default_bin
from jaxttt.ponder.ppo import ChunkTable, normalise, run_ppo, train_ppo

METHODS = ("SKIP", "UPDATE_1", "UPDATE_2", "UPDATE_4", "random", "oracle", "oracle_best",
           "gated", "gated_lag1", "ppo", "ppo_lag1")
OVERHEAD = {"gated": "signal", "gated_lag1": "signal", "ppo": "features", "ppo_lag1": "features"}


def evaluate_seed(runner: ChunkRunner, tokenizer, tcfg: PonderTrainConfig, ecfg: PonderEvalConfig,
                  *, seed: int, block: int = 0, progress=print) -> dict:
    """One seed: per-method actions [C], the [C, A] loss table, FLOPs and the execution check."""
    scored = score_seed(runner, tokenizer, tcfg, ecfg, seed=seed, block=block, progress=progress)
    return decide_seed(runner, scored, ecfg, seed=seed, progress=progress)


def score_seed(runner: ChunkRunner, tokenizer, tcfg: PonderTrainConfig, ecfg: PonderEvalConfig,
               *, seed: int, block: int = 0, progress=print) -> dict:
    """The budget-free part of a seed: chunks, [C, A] loss tables, gate signal, PPO features."""
    T, B, vocab = tcfg.chunk_len, ecfg.batch_size, runner.vocab
    val = ecfg.val or str(default_bin(tokenizer, "val"))
    train = ecfg.train or str(default_bin(tokenizer, "train"))
    x, y = consecutive_chunks(val, T, ecfg.chunks, start=block * ecfg.chunks, vocab=vocab)
    xt, yt = consecutive_chunks(train, T, ecfg.train_chunks, start=seed * ecfg.train_chunks,
                                vocab=vocab)
    progress(f"seed {seed}: scoring {len(x)} held-out and {len(xt)} policy-training chunks "
             f"under {len(ACTIONS)} actions")
    losses, signal, feats = runner.score(x, y, B, vocab=vocab, eos_id=tokenizer.eos_id)
    losses_t, _, feats_t = runner.score(xt, yt, B, vocab=vocab, eos_id=tokenizer.eos_id)
    feats_t, feats = normalise(feats_t, feats)
    return {"x": x, "y": y, "losses": losses, "signal": signal,
            "table_t": ChunkTable(losses_t, feats_t, None),
            "table": ChunkTable(losses, feats, signal), "flops": _flops(runner, B, T)}


_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flops(runner: ChunkRunner, B: int, T: int) -> dict:
    """runner.flops once per runner and shape (seeds on one run share their programs)."""
    per = _FLOPS.setdefault(runner, {})
    if (B, T) not in per:
        per[(B, T)] = runner.flops(B, T, runner.d_model)
    return per[(B, T)]


def decide_seed(runner: ChunkRunner, scored: dict, ecfg: PonderEvalConfig, *, seed: int,
                progress=print) -> dict:
    """Every method's actions at `ecfg.budget` on a scored seed, and the execution check."""
    x, y, losses = scored["x"], scored["y"], scored["losses"]
    rate, a = ecfg.target_rate, ecfg.gate_action
    gate = lambda lag: P.ThresholdGate(rate, action=a, calib=ecfg.calib_chunks, ema=ecfg.gate_ema,  # noqa: E731
                                       kp=ecfg.gate_kp, ki=ecfg.gate_ki, kd=ecfg.gate_kd,
                                       lag=lag).run(scored["signal"])[0]
    actions = {name: P.fixed(len(x), i) for i, name in enumerate(ACTIONS)}
    actions.update(random=P.random_rate(len(x), rate, a, seed), oracle=P.oracle_top(losses, rate, a),
                   oracle_best=P.oracle_best(losses), gated=gate(0), gated_lag1=gate(1))
    for lag, name in ((0, "ppo"), (1, "ppo_lag1")):
        progress(f"seed {seed}: training {name} ({ecfg.ppo_iters} PPO iterations, "
                 f"budget {ecfg.budget:g})")
        policy = train_ppo(scored["table_t"], ecfg, seed=seed, lag=lag)
        actions[name] = run_ppo(policy, scored["table"], ecfg)
    executed = runner.run(x, y, actions["gated"])
    check = float(np.max(np.abs(executed - losses[np.arange(len(x)), actions["gated"]])))
    return {"actions": actions, "losses": losses, "executed_check": check,
            "flops": scored["flops"]}


def summarise(seeds: list[dict], ecfg: PonderEvalConfig, *, ttt_dims: dict) -> dict:
    """The method table: loss/ppl/cost/rate/FLOPs/recovery with CIs and IQMs over seeds."""
    flops = {k: float(np.mean([s["flops"][k] for s in seeds])) for k in seeds[0]["flops"]}
    per = {}
    for m in METHODS:
        nll = [s["losses"][np.arange(len(s["actions"][m])), s["actions"][m]] for s in seeds]
        acts = [s["actions"][m] for s in seeds]
        seed_loss = [float(v.mean()) for v in nll]
        lo, hi = stats.bootstrap_ci(nll, n=ecfg.bootstrap, seed=0)
        cost = [float(np.mean(np.asarray(NOMINAL_COST)[ac])) for ac in acts]
        fl = [float(np.mean([flops[ACTIONS[i]] for i in ac]) + flops.get(OVERHEAD.get(m, ""), 0.0))
              for ac in acts]  # the executed action's program + the decision program
        per[m] = {"loss": float(np.mean(seed_loss)), "loss_ci95": [lo, hi],
                  "loss_iqm": stats.iqm(seed_loss), "loss_per_seed": seed_loss,
                  "ppl": math.exp(float(np.mean(seed_loss))),
                  "update_rate": float(np.mean([(ac > 0).mean() for ac in acts])),
                  "action_freq": {ACTIONS[i]: float(np.mean([(ac == i).mean() for ac in acts]))
                                  for i in range(len(ACTIONS))},
                  "cost": float(np.mean(cost)), "flops_per_chunk": float(np.mean(fl))}
    skip = [s["losses"][:, 0] for s in seeds]
    orc = [s["losses"][np.arange(len(s["actions"]["oracle"])), s["actions"]["oracle"]] for s in seeds]
    for m in METHODS:  # paired over chunks: the differences are far tighter than the losses
        nll = [s["losses"][np.arange(len(s["actions"][m])), s["actions"][m]] for s in seeds]
        cols = [np.stack([a, b, c], -1) for a, b, c in zip(skip, nll, orc)]
        per[m]["delta_vs_skip"] = float(np.mean([b.mean() - a.mean() for a, b in zip(skip, nll)]))
        per[m]["delta_vs_skip_ci95"] = list(stats.paired_bootstrap_ci(
            cols, lambda v: v[1] - v[0], n=ecfg.bootstrap))
        per[m]["recovery_ci95"] = list(stats.paired_bootstrap_ci(
            cols, lambda v: (v[0] - v[1]) / (v[0] - v[2]) if v[0] > v[2] else np.nan,
            n=ecfg.bootstrap))
    for m in METHODS:
        rec = [stats.recovery(per["SKIP"]["loss_per_seed"][i], per[m]["loss_per_seed"][i],
                              per["oracle"]["loss_per_seed"][i]) for i in range(len(seeds))]
        per[m]["recovery"] = stats.recovery(per["SKIP"]["loss"], per[m]["loss"], per["oracle"]["loss"])
        per[m]["recovery_per_seed"] = rec
        finite = [r for r in rec if np.isfinite(r)]
        per[m]["recovery_iqm"] = stats.iqm(finite) if finite else float("nan")
        per[m]["recovery_seed_mean"], per[m]["recovery_seed_sd"] = _mean_sd(finite)
    analytic = {a: analytic_ttt_flops(**ttt_dims, steps=s) for a, s in zip(ACTIONS, STEPS)}
    return {"methods": per, "flops_per_chunk_hlo": flops,
            "ttt_flops_per_token_analytic": analytic,
            "nominal_cost": dict(zip(ACTIONS, NOMINAL_COST)),
            "target_rate": ecfg.target_rate, "budget": ecfg.budget,
            "gate_action": ACTIONS[ecfg.gate_action], "seeds": len(seeds),
            "executed_check_max_abs": max(s["executed_check"] for s in seeds)}


def _mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (ddof 1; sd 0 for one, nan for none)."""
    v = np.asarray(values, np.float64).ravel()
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pareto_plot(summary: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxttt.eval.plots import save

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    names = list(summary["methods"])
    cost = [summary["methods"][m]["cost"] for m in names]
    loss = [summary["methods"][m]["delta_vs_skip"] for m in names]
    err = np.array([[l - summary["methods"][m]["delta_vs_skip_ci95"][0],
                     summary["methods"][m]["delta_vs_skip_ci95"][1] - l]
                    for m, l in zip(names, loss)]).T
    front = set(stats.pareto_front(cost, loss))
    for i, m in enumerate(names):
        ax.errorbar(cost[i], loss[i], yerr=err[:, i:i + 1], fmt="o" if i in front else "x",
                    capsize=3, label=m)
        ax.annotate(m, (cost[i], loss[i]), fontsize=7, xytext=(5, 4 - 9 * (i % 3)),
                    textcoords="offset points")
    ax.set_xlabel("mean nominal cost per chunk (x one forward; SKIP = 1)")
    ax.set_ylabel("held-out loss - SKIP loss (nats / token)")
    ax.set_title(f"PonderTTT cost vs loss ({summary['seeds']} seeds, paired 95% CI; "
                 "o = Pareto front)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return save(fig, path)


POLICIES = ("random", "gated", "gated_lag1", "ppo", "ppo_lag1")  # methods that spend a budget


def write_recovery(summaries: list[dict], out: Path) -> Path:
    """Recovery vs budget over several `summarise` results: recovery.json + recovery.png."""
    budgets = [s["budget"] for s in summaries]
    table = {m: {key: [s["methods"][m][src] for s in summaries] for key, src in
                 (("mean", "recovery_seed_mean"), ("sd", "recovery_seed_sd"),
                  ("per_seed", "recovery_per_seed"), ("update_rate", "update_rate"),
                  ("cost", "cost"), ("delta_vs_skip", "delta_vs_skip"))}
             for m in summaries[0]["methods"]}
    path = out / "recovery.json"
    path.write_text(json.dumps({"budgets": budgets, "seeds": summaries[0]["seeds"],
                                "target_rate": [s["target_rate"] for s in summaries],
                                "methods": table}, indent=2, default=_json) + "\n")
    recovery_plot(budgets, table, summaries[0]["seeds"], out / "recovery.png")
    return path


def recovery_plot(budgets: list[float], table: dict, n_seeds: int, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxttt.eval.plots import save

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, m in enumerate(POLICIES):
        shift = (i - (len(POLICIES) - 1) / 2) * 0.012 * (max(budgets) - min(budgets) or 1)
        ax.errorbar([b + shift for b in budgets], table[m]["mean"], yerr=table[m]["sd"],
                    fmt="o-", capsize=3, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="oracle (same rate) = 1")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("budget: mean nominal cost per chunk (x one forward; SKIP = 1)")
    ax.set_ylabel("recovery = (SKIP - method) / (SKIP - oracle) (fraction)")
    ax.set_title(f"PonderTTT recovery vs budget (mean ± sd over {n_seeds} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def write_tables(seeds: list[dict], out: Path) -> Path:
    """Per seed: the [C, A] loss table and every method's actions (to recompute anything)."""
    arrays = {f"seed{i}/losses": s["losses"] for i, s in enumerate(seeds)}
    arrays.update({f"seed{i}/actions/{m}": a for i, s in enumerate(seeds)
                   for m, a in s["actions"].items()})
    np.savez_compressed(out / "tables.npz", **arrays)
    return out / "tables.npz"


def write_results(summary: dict, out: Path, extra: dict) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps({**summary, **extra}, indent=2, default=_json) + "\n")
    return path


def _json(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def load_train_config(run_dir: Path) -> PonderTrainConfig:
    return C.load(PonderTrainConfig, run_dir / "config.yaml")
