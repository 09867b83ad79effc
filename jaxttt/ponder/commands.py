"""`jaxttt ponder train` and `jaxttt ponder eval`: thin argparse wrappers over jaxttt.ponder."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ponder", help="PonderTTT: chunk-level fast weights with a budget",
                              description="TTT-Linear fast weights on a frozen trunk; per chunk "
                                          "SKIP / UPDATE_1 / UPDATE_2 / UPDATE_4 under a budget.")
    sub = p.add_subparsers(dest="ponder_command", required=True, metavar="SUBCOMMAND")

    t = sub.add_parser("train", help="outer loop: train the TTT layer on a frozen trunk",
                       description="Train (or resume: same --out) the fast-weight layer; only "
                                   "its parameters learn.")
    t.add_argument("--ckpt", required=True, help="trunk: a pretraining run (or checkpoint) "
                   "dir, or a named model (e.g. smollm2-135m-instruct)")
    t.add_argument("--out", required=True, help="run directory (resumed if it has checkpoints)")
    t.add_argument("--config", default=None, help="YAML, e.g. configs/ponder/tiny.yaml")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. steps=100 ttt.mini_batch=8")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="method table over seeds: results.json + Pareto plot",
                       description="Score SKIP, UPDATE_1/2/4, random, oracle, gated and PPO "
                                   "policies on held-out chunks; one seed per --run.")
    e.add_argument("--run", required=True, action="append",
                   help="a `ponder train` run dir; repeat for more seeds")
    e.add_argument("--out", required=True, help="new output directory")
    e.add_argument("--budget", type=float, nargs="+", default=None,
                   help="mean nominal cost per chunk (SKIP=1, UPDATE_1=3, UPDATE_2=5, UPDATE_4=12); "
                        "several: chunks scored once, one table per budget under DIR/budget-B/ "
                        "and recovery vs budget (recovery.json, recovery.png) in DIR")
    e.add_argument("--seeds", type=int, default=None,
                   help="with one --run: seeds on disjoint held-out blocks (default 1)")
    e.add_argument("--config", default=None, help="YAML of eval settings (configs/ponder/eval.yaml)")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. chunks=128 ppo_iters=50")
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from jaxttt import config as C
    from jaxttt.ponder.config import PonderTrainConfig
    from jaxttt.ponder.train import train

    cfg = C.load(PonderTrainConfig, args.config, [*args.overrides, f"base={args.ckpt}"])
    run_dir = train(cfg, args.out)
    print(f"run directory: {run_dir}", flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jaxttt import config as C
    from jaxttt.errors import UserError
    from jaxttt.ponder import evaluate as E
    from jaxttt.ponder.actions import ChunkRunner
    from jaxttt.ponder.config import PonderEvalConfig
    from jaxttt.ponder.train import load_ponder
    from jaxttt.runs import fresh_run_dir

    budgets = list(dict.fromkeys(args.budget)) if args.budget else [None]
    ecfgs = [C.load(PonderEvalConfig, args.config,
                    list(args.overrides) + ([f"budget={b}"] if b is not None else []))
             for b in budgets]  # every budget is validated before any work
    if args.seeds is not None and (args.seeds < 1 or len(args.run) > 1):
        raise UserError("--seeds: a positive count, and only with a single --run "
                        "(with several runs each run is one seed)")
    plan = ([(r, i, 0) for i, r in enumerate(args.run)] if len(args.run) > 1
            else [(args.run[0], i, i) for i in range(args.seeds or 1)])
    models, dims = {}, None
    for run, _, _ in plan:  # every run is checked before anything is written
        if run not in models:  # one set of compiled programs per run
            model, tok, tcfg, _ = load_ponder(run)
            models[run] = (ChunkRunner(model), tok, tcfg)
            dims = dict(d_model=model.trunk.cfg.d_model, n_heads=model.ttt.n_heads,
                        d_head=model.ttt.d_head, mini_batch=model.ttt.mini_batch)
    out = fresh_run_dir(args.out)
    scored = [E.score_seed(models[run][0], models[run][1], models[run][2], ecfgs[0], seed=seed,
                           block=block) for run, seed, block in plan]  # budget-free, once
    summaries = []
    for ecfg in ecfgs:
        seeds = [E.decide_seed(models[run][0], sc, ecfg, seed=seed)
                 for (run, seed, _), sc in zip(plan, scored)]
        summary = E.summarise(seeds, ecfg, ttt_dims=dims)
        where = out if len(ecfgs) == 1 else out / f"budget-{ecfg.budget:g}"
        where.mkdir(exist_ok=True)
        E.pareto_plot(summary, where / "pareto.png")
        E.write_tables(seeds, where)
        path = E.write_results(summary, where, {"runs": [str(r) for r, _, _ in plan],
                                                "eval_config": C.to_dict(ecfg),
                                                "chunk_len": models[plan[0][0]][2].chunk_len})
        print(f"budget {ecfg.budget:g} (target {E.ACTIONS[ecfg.gate_action]} rate "
              f"{ecfg.target_rate:.2f}), {len(seeds)} seed(s):", flush=True)
        _print_table(summary)
        print(f"results: {path}", flush=True)
        summaries.append(summary)
    if len(summaries) > 1:
        print(f"recovery vs budget: {E.write_recovery(summaries, out)}", flush=True)
    return 0


def _print_table(summary: dict) -> None:
    print(f"{'method':12s} {'loss':>7s} {'- SKIP [paired 95% CI]':>27s} {'ppl':>6s} {'rate':>5s} "
          f"{'cost':>5s} {'MFLOP/chunk':>11s} {'recovery [95% CI]':>22s} "
          f"{'per-seed recovery mean ± sd':>27s}")
    for m, r in summary["methods"].items():
        (lo, hi), (rlo, rhi) = r["delta_vs_skip_ci95"], r["recovery_ci95"]
        print(f"{m:12s} {r['loss']:7.4f} {r['delta_vs_skip']:+8.4f} [{lo:+8.4f},{hi:+8.4f}] "
              f"{r['ppl']:6.2f} {r['update_rate']:5.2f} {r['cost']:5.2f} "
              f"{r['flops_per_chunk'] / 1e6:11.2f} {r['recovery']:6.3f} [{rlo:6.3f},{rhi:6.3f}] "
              f"{r['recovery_seed_mean']:13.3f} ± {r['recovery_seed_sd']:.3f}")
