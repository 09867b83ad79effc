"""`jaxttt discover-compare`: TTT-Discover vs best-of-N from θ0 at an equal action budget."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `discover-compare` to the `jaxttt` parser."""
    p = subparsers.add_parser(
        "discover-compare", help="TTT-Discover vs best-of-N from θ0, equal action budget, over seeds",
        description="For every seed and preset (official = configs/discover/official.yaml, "
                    "handoff = configs/discover/default.yaml) runs `jaxttt discover`'s loop with "
                    "its same-budget best-of-N baseline (both arms at T=1, top_p=1, the same "
                    "max_new_tokens); writes OUT/PRESET/seedS/ run directories, compare.json, "
                    "compare.md (best reward mean ± sd over seeds) and compare.png (best reward vs "
                    "sampled actions). Finished runs in OUT are reused on a rerun.")
    p.add_argument("--ckpt", required=True, help="model run directory or a named model "
                                                 "(e.g. smollm2-135m-instruct)")
    p.add_argument("--env", required=True, help="e.g. numeric, humaneval:HumanEval/13, "
                                                "circle_packing:n=26")
    p.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                   help="env constructor option, value parsed as YAML (repeatable)")
    p.add_argument("--preset", nargs="+", default=["official", "handoff"],
                   help="official and/or handoff (default: both)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4, help="TTT steps per run (default 4)")
    p.add_argument("--rollouts", type=int, default=8, help="actions per step, both arms (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="action length cap (default 128)")
    p.add_argument("--out", required=True, help="output directory (finished runs in it are reused)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted DiscoverConfig overrides for every run, e.g. optim.lr=1e-4")
    p.set_defaults(func=_compare)


def build_spec(args: argparse.Namespace):
    from jaxttt.discover.commands import parse_env_options
    from jaxttt.discover.compare import CompareSpec

    spec = CompareSpec(env=args.env, presets=tuple(args.preset), seeds=tuple(args.seeds),
                       steps=args.steps, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
                       env_options=parse_env_options(args.env_option),
                       overrides=tuple(args.overrides))
    spec.validate()
    return spec


def _compare(args: argparse.Namespace) -> int:
    from jaxttt.discover.compare import markdown, run_compare_from_checkpoint

    spec = build_spec(args)
    table = run_compare_from_checkpoint(args.ckpt, spec, args.out, tokenizer=args.tokenizer,
                                        progress=not args.no_progress)
    print(markdown(table), flush=True)
    print(json.dumps({r["arm"]: {k: r["best_reward"][k] for k in ("mean", "sd")}
                      for r in table["rows"]}, ensure_ascii=False), flush=True)
    return 0
