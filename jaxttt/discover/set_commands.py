"""`jaxttt discover-set`: a thin argparse wrapper over `run_discover_set_from_checkpoint`.

Precedence (the seed's): command-line flags > --config file > defaults. The seed's flag
spellings are accepted beside ours (--outer_steps, --G, --B, --benchmark_after_hotswap, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

# flag -> (config key, how the value becomes an override)
_NAMED = {
    "steps": "steps", "rollouts": "rollouts", "groups": "groups", "seed": "seed",
    "benchmark_after_hotswap": "hot_swap_eval", "benchmark_max_examples": "benchmark_max_examples",
    "benchmark_temperature": "benchmark_temperature",
    "benchmark_max_new_tokens": "benchmark_max_new_tokens",
}
_OPTIONS = {"data": "path", "split": "split", "max_examples": "max_examples"}


def _flag(p: argparse.ArgumentParser, name: str, *aliases: str, **kw) -> None:
    """--name-with-dashes plus the seed's --name_with_underscores and any aliases."""
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] + ([f"--{name}"] if "_" in name else []) + list(aliases)
    p.add_argument(*spellings, dest=name, default=None, **kw)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `discover-set` to the `jaxttt` parser."""
    p = subparsers.add_parser(
        "discover-set", help="TTT-Discover over a problem set (GSM8K-style), with hot-swap "
                             "benchmark and per-step adapter checkpoints",
        description="Each outer step selects --groups problems by the reuse score, samples "
                    "--rollouts answers for each from the current LoRA adapter, and makes one "
                    "entropic-objective update (discover's step). Writes log.jsonl (metrics per "
                    "step), discovery/baseline/benchmark logs, adapters/ (orbax + safetensors) "
                    "and result.json to --out (new or empty).")
    p.add_argument("--ckpt", required=True, help="run directory holding θ0 (pretrained or converted)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--config", default=None, help="YAML, e.g. configs/discover/gsm8k_set.yaml")
    p.add_argument("--problems", default=None,
                   help="gsm_synth | gsm8k | humaneval | mbpp | package.module:Class | file.py:Class "
                        "(default: the config's env)")
    _flag(p, "data", help="gsm8k: a JSONL file, or a directory holding <split>.jsonl")
    _flag(p, "split", help="gsm8k split (file <split>.jsonl in --data), e.g. test")
    _flag(p, "max_examples", type=int, help="problems in the set (the first N)")
    _flag(p, "steps", "--outer-steps", "--outer_steps", type=int, help="outer steps")
    _flag(p, "rollouts", "--G", type=int, help="samples per selected problem (the seed's G)")
    _flag(p, "groups", "--B", type=int, help="problems selected per outer step (the seed's B)")
    _flag(p, "seed", type=int)
    _flag(p, "benchmark_after_hotswap", metavar="true|false",
          help="benchmark the adapter on held-out problems after every update")
    _flag(p, "benchmark_max_examples", type=int, help="held-out problems benchmarked")
    _flag(p, "benchmark_temperature", type=float, help="0 = greedy (default)")
    _flag(p, "benchmark_max_new_tokens", type=int)
    _flag(p, "checkpoint_after_outer_step", metavar="true|false",
          help="adapters after every outer step (true: save_every=1; false: only the last)")
    p.add_argument("--env-option", action="append", default=[], metavar="KEY=VALUE",
                   help="problem-set option, value parsed as YAML (repeatable), e.g. seed=3")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's)")
    p.add_argument("--verbose", "--debug", action="store_true",
                   help="log load stages, prompt sizes, generation, update and reward progress")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. optim.lr=1e-4 sampling.max_new_tokens=128")
    p.set_defaults(func=_discover_set)


def build_config(args: argparse.Namespace):
    """DiscoverSetConfig: defaults < --config < KEY=VALUE overrides < named flags."""
    import dataclasses

    import yaml

    from jaxttt import config as C
    from jaxttt.config import ConfigError
    from jaxttt.discover.commands import parse_env_options
    from jaxttt.discover.setrun import DiscoverSetConfig

    named = [f"{key}={getattr(args, flag)}" for flag, key in _NAMED.items()
             if getattr(args, flag) is not None]
    if args.checkpoint_after_outer_step is not None:
        on = yaml.safe_load(str(args.checkpoint_after_outer_step))
        if not isinstance(on, bool):
            raise ConfigError(f"--checkpoint-after-outer-step: expected true or false, got "
                              f"{args.checkpoint_after_outer_step!r}")
        named.append(f"save_every={1 if on else 0}")
    cfg = C.load(DiscoverSetConfig, args.config, list(args.overrides) + named)
    options = dict(cfg.env_options)
    options.update({opt: v for flag, opt in _OPTIONS.items() if (v := getattr(args, flag)) is not None})
    options.update(parse_env_options(args.env_option))
    env = args.problems if args.problems is not None else cfg.env
    cfg = dataclasses.replace(cfg, env=env, env_options=options)
    cfg.validate()
    return cfg


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _verbose_logging() -> None:
    logger = logging.getLogger("jaxttt.discover.set")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # once, even when the root logger has a handler


def _discover_set(args: argparse.Namespace) -> int:
    from jaxttt.discover.setrun import run_discover_set_from_checkpoint

    if args.verbose:
        _verbose_logging()
    cfg = build_config(args)
    summary = run_discover_set_from_checkpoint(args.ckpt, cfg, args.out, tokenizer=args.tokenizer,
                                               progress=not args.no_progress)
    keys = ("run_dir", "problems", "n_problems", "n_heldout", "steps", "samples",
            "final_best_accuracy", "baseline_best_accuracy", "baseline_samples",
            "final_hotswap_accuracy", "step_wall_s", "n_errors", "final_adapter")
    print(json.dumps({k: summary[k] for k in keys}, indent=2, ensure_ascii=False), flush=True)
    return 0
