"""`jaxttt discover`: a thin argparse wrapper over `run_discover_from_checkpoint`."""
from __future__ import annotations

import argparse
import dataclasses
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `discover` to the `jaxttt` parser."""
    p = subparsers.add_parser(
        "discover", help="TTT-Discover: test-time RL of LoRA adapters on one problem",
        description="Entropic-objective RL with PUCT reuse of an archive, updating only LoRA "
                    "adapters (handoff K4). Writes log.jsonl, discovery_log.jsonl, adapters/, "
                    "result.json and config.yaml to --out (which must be new or empty).")
    p.add_argument("--ckpt", required=True, help="pretraining run directory (or one checkpoint)")
    p.add_argument("--env", default=None,
                   help="toy | numeric | code | gsm8k | package.module:Class | path/file.py:Class "
                        "(default: the config's env)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--config", default=None, help="YAML, e.g. configs/discover/tiny.yaml")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rollouts", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                   help="env constructor option, value parsed as YAML (repeatable), e.g. "
                        "target=HELLO or 'target=[1, 2]'")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. lr=1e-4 sampling.max_new_tokens=32")
    p.set_defaults(func=_discover)


def parse_env_options(items: list[str]) -> dict:
    """`KEY=VALUE` pairs with YAML-parsed values."""
    import yaml

    from jaxttt.config import ConfigError

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--env-option {item!r}: expected KEY=VALUE (e.g. target=HELLO)")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def build_config(args: argparse.Namespace):
    """DiscoverConfig from --config, the overrides, the named flags and --env/--env-option."""
    from jaxttt import config as C

    named = [f"{k}={v}" for k in ("steps", "rollouts", "seed")
             if (v := getattr(args, k)) is not None]
    cfg = C.load(C.DiscoverConfig, args.config, list(args.overrides) + named)
    env = args.env if args.env is not None else cfg.env
    options = {**cfg.env_options, **parse_env_options(args.env_option)}
    cfg = dataclasses.replace(cfg, env=env, env_options=options)
    cfg.validate()
    return cfg


def _discover(args: argparse.Namespace) -> int:
    from jaxttt.discover.loop import is_main, run_discover_from_checkpoint

    cfg = build_config(args)
    summary = run_discover_from_checkpoint(args.ckpt, cfg, args.out, tokenizer=args.tokenizer,
                                           progress=not args.no_progress)
    if not is_main():  # every process of a multi-process run holds the same summary
        return 0
    keys = ("run_dir", "problem_id", "steps", "samples", "best_reward", "baseline_best_reward",
            "best_state", "step_wall_s", "rollout_tokens_per_s", "n_errors", "final_adapter")
    print(json.dumps({k: summary[k] for k in keys}, indent=2, ensure_ascii=False), flush=True)
    return 0
