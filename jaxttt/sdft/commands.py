"""`jaxttt sdft` and `jaxttt consolidate`: thin argparse wrappers over the library.

Config overrides are trailing KEY=VALUE words (e.g. `steps_per_block=10 sampling.top_p=0.9`);
after `consolidate --discoveries A B`, put them behind `--` so they are not read as run dirs.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sdft` and `consolidate` to the `jaxttt` parser."""
    _register_sdft(subparsers)
    _register_consolidate(subparsers)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (or checkpoint step) to start from")
    p.add_argument("--out", required=True, help="new output run directory (must not exist or be empty)")
    p.add_argument("--config", default="sdft/default.yaml", help="SDFT YAML (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's)")
    p.add_argument("--replay", nargs="+", default=(), metavar="JSONL",
                   help="past SDFT JSONL files that pre-fill the replay buffer")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def _register_sdft(subparsers) -> None:
    p = subparsers.add_parser("sdft", help="gated continual SDFT on (prompt, demonstration) JSONL")
    p.add_argument("--data", required=True, help='JSONL: {"prompt": ..., "demonstration": ...}')
    _common(p)
    p.set_defaults(func=_sdft)


def _register_consolidate(subparsers) -> None:
    p = subparsers.add_parser("consolidate",
                              help="TTT-Discover logs -> SDFT dataset -> gated SDFT of the base")
    p.add_argument("--discoveries", nargs="+", required=True, metavar="RUN_DIR",
                   help="discovery run directories (each with discovery_log.jsonl)")
    p.add_argument("--min-reward", type=float, default=0.0, help="keep rewards >= this")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k best distinct discoveries per problem (default 1)")
    p.add_argument("--demonstration", choices=("state", "action"), default="state",
                   help="what becomes the demonstration (default: the parsed state)")
    _common(p)
    p.set_defaults(func=_consolidate)


def _load_config(args):
    from jaxttt.config import SDFTConfig, load
    return load(SDFTConfig, args.config, args.overrides)


def _run_kwargs(args) -> dict:
    return dict(tokenizer=args.tokenizer, replay_sources=list(args.replay),
                skip_bad=args.skip_bad, progress=not args.no_progress)


def _is_main() -> bool:
    """Process 0 prints (every process of a multi-process run holds the same summary)."""
    import jax
    return jax.process_index() == 0


def _report(summary: dict) -> None:
    keys = ("out_dir", "steps", "accepted", "rejected", "checkpoint_step")
    if _is_main():
        print(json.dumps({k: summary.get(k) for k in keys}))


def _sdft(args: argparse.Namespace) -> None:
    from jaxttt.sdft.loop import run_sdft

    summary = run_sdft(args.ckpt, args.data, args.out, _load_config(args), **_run_kwargs(args))
    _report(summary)


def _consolidate(args: argparse.Namespace) -> None:
    from jaxttt.sdft.consolidate import consolidate

    kw = _run_kwargs(args)
    summary = consolidate(args.discoveries, args.ckpt, args.out, _load_config(args),
                          min_reward=args.min_reward, best_per_problem=args.top_k is None,
                          top_k=args.top_k, demonstration=args.demonstration,
                          skip_bad=kw.pop("skip_bad"), **kw)
    _report(summary)
    if _is_main():
        print(json.dumps({k: summary["consolidation"][k] for k in ("rows", "kept", "problems")}))
