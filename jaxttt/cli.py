"""The `jaxttt` command: parses arguments and calls library functions (nothing else).

Each package contributes its subcommands through a `commands.register(subparsers)` function;
heavy imports happen inside the handlers so `jaxttt --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that register subcommands, in the order they appear in --help
COMMAND_MODULES = (
    "jaxttt.data.commands",  # tokenizer, data
    "jaxttt.train.commands",  # pretrain, sample
    "jaxttt.eval.commands",  # eval
    "jaxttt.discover.commands",  # discover
    "jaxttt.sdft.commands",  # sdft, consolidate
    "jaxttt.bench",  # bench
    "jaxttt.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxttt", description="mHC pretraining, TTT-Discover and SDFT on JAX/Flax NNX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency, not an absent command module
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxttt.sharding import init_distributed

    init_distributed()
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
