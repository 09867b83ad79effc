"""`jaxttt sdft-compare`: SDFT vs SFT on the tool-call skill over arms × seeds (a thin wrapper
over `jaxttt.sdft.compare.compare`)."""
from __future__ import annotations

import argparse
import json

from jaxttt.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    from jaxttt.sdft.compare import ARMS

    p = subparsers.add_parser(
        "sdft-compare", help="SDFT vs SFT on a new skill: accuracy against forgetting, arms x seeds",
        description="Train each (arm, seed) cell from --ckpt on the tool-call skill, then measure "
                    "held-out new-task accuracy, held-out perplexity, capability probes and "
                    "HumanEval pass@1; writes OUT/table.md, OUT/results.json, OUT/tradeoff.png.")
    p.add_argument("--ckpt", help="run directory or named model to start from (not needed with "
                   "--report)")
    p.add_argument("--out", required=True, help="new output directory (or one to --resume)")
    p.add_argument("--config", default="sdft/skill_tool_call.yaml",
                   help="SDFT YAML shared by every arm (default: %(default)s)")
    p.add_argument("--arms", nargs="+", default=["sft", "sdft-rev"], choices=list(ARMS),
                   metavar="ARM", help=f"arms to run, from: {', '.join(ARMS)} (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument("--train", type=int, default=200, help="training requests (default: %(default)s)")
    p.add_argument("--test", type=int, default=30, help="held-out requests (default: %(default)s)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the skill data")
    p.add_argument("--humaneval", type=int, default=10,
                   help="first N HumanEval tasks for greedy pass@1; 0 = skip (default: %(default)s)")
    p.add_argument("--humaneval-max-new-tokens", type=int, default=256)
    p.add_argument("--skill-max-new-tokens", type=int, default=48)
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished cells in OUT (same settings; more arms/seeds allowed)")
    p.add_argument("--unsafe-local-exec", action="store_true",
                   help="run HumanEval unconfined where the kernel cannot confine (recorded)")
    p.add_argument("--report", action="store_true",
                   help="only rebuild OUT's table, results.json and plot from its finished cells")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every arm")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from jaxttt.sdft.compare import compare, report

    if args.report:
        res = report(args.out)
    elif not args.ckpt:
        raise UserError("--ckpt is required (the model every cell starts from), unless --report")
    else:
        res = compare(args.ckpt, args.out, seeds=args.seeds, arms=args.arms, config=args.config,
                      overrides=args.overrides, n_train=args.train, n_test=args.test,
                      data_seed=args.data_seed, humaneval=args.humaneval,
                      he_tokens=args.humaneval_max_new_tokens,
                      skill_tokens=args.skill_max_new_tokens, resume=args.resume,
                      unsafe_local_exec=args.unsafe_local_exec, progress=not args.no_progress)
    print(res["table"], end="")
    print(json.dumps({"out": str(args.out), "cells": len(res["cells"])}))
