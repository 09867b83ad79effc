"""The `jaxttt` command: parses arguments and calls library functions (nothing else).

Each package contributes its subcommands through a `commands.register(subparsers)` function;
heavy imports happen inside the handlers so `jaxttt --help` is instant.

One error policy for every command: a user error (`jaxttt.errors.UserError` and its subclasses
ConfigError, RunDirError, CheckpointError; a missing or unreadable file; a bad value; a bad env
spec) prints ONE line `jaxttt <command>: error: <message>` on stderr and exits with status 1;
a command-line mistake prints one line and exits with status 2. `JAXTTT_TRACEBACK=1` shows the
traceback instead (for bug reports).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# modules that register subcommands, in the order they appear in --help
COMMAND_MODULES = (
    "jaxttt.data.commands",  # tokenizer, data
    "jaxttt.train.commands",  # pretrain, sample
    "jaxttt.train.depth_commands",  # depth-study
    "jaxttt.model.commands",  # convert, export
    "jaxttt.eval.commands",  # eval
    "jaxttt.eval.codeeval_commands",  # codeeval
    "jaxttt.discover.commands",  # discover
    "jaxttt.discover.set_commands",  # discover-set
    "jaxttt.discover.compare_commands",  # discover-compare
    "jaxttt.sdft.commands",  # sdft, consolidate
    "jaxttt.sdft.compare_commands",  # sdft-compare
    "jaxttt.seal.commands",  # serve-ttt, seal-query, seal-bench
    "jaxttt.ponder.commands",  # ponder train, ponder eval
    "jaxttt.bench",  # bench
    "jaxttt.demo",  # demo
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage dump) naming the command."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's to fix (printed as one line, status 1)."""
    from jaxttt.errors import UserError

    types: list[type[BaseException]] = [UserError, OSError, ValueError]
    try:  # plug-in envs raise EnvError for a bad spec or options
        from jaxttt.discover.env import EnvError
        types.append(EnvError)
    except ImportError:
        pass
    return tuple(types)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (OSError: `FILE: reason`)."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from jaxttt.sharding import init_distributed
        from jaxttt.runs import enable_compile_cache, limit_malloc_arenas

        limit_malloc_arenas()  # before XLA's threads allocate
        init_distributed()
        enable_compile_cache()  # every command: a rerun or resume reuses compiled programs
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"jaxttt {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if os.environ.get("JAXTTT_TRACEBACK") or not isinstance(e, user_errors()):
            raise
        print(f"jaxttt {args.command}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
