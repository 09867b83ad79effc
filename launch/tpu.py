"""Cloud TPU VM launcher: thin wrappers that build `gcloud compute tpus tpu-vm ...` commands.

    python -m launch.tpu create --name my-tpu --zone us-central2-b --type v4-8
    python -m launch.tpu setup  --name my-tpu --zone us-central2-b
    python -m launch.tpu run    --name my-tpu --zone us-central2-b -- jaxttt pretrain ...
    python -m launch.tpu run    --name my-tpu --zone us-central2-b -- jaxttt discover ...
    python -m launch.tpu logs | stop | delete --name my-tpu --zone us-central2-b

Every action targets all workers of the slice (`--worker=all`). `run` starts the same command
(any `jaxttt` subcommand with its arguments: pretrain, discover, sdft, consolidate, ...) on each
worker under nohup with JAXTTT_COORDINATOR=auto, so `init_distributed()` lets
`jax.distributed.initialize()` discover the slice topology. `--dry-run` prints the commands
(shell-quoted, one per line) instead of running them.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from launch.local import split_command

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ("create", "setup", "run", "logs", "stop", "delete")
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]

# Default TPU VM runtime (software) version per accelerator family; --runtime-version overrides.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Paths on each worker, in the login user's home directory (expanded by the worker's shell).
REMOTE_TARBALL = "jaxttt.tar.gz"  # scp destination, relative to home
REMOTE_SRC = "$HOME/jaxttt"
REMOTE_VENV = "$HOME/jaxttt-venv"
REMOTE_LOG_DIR = "$HOME/jaxttt-logs"
# Matches the venv's console scripts (`jaxttt ...`) but not the shell running pkill itself.
PKILL_PATTERN = "[j]axttt-venv/bin/"


def default_runtime_version(accelerator_type: str) -> str:
    """The runtime version for e.g. `v4-8` or `v5litepod-16`; error for unknown families."""
    family = accelerator_type.split("-")[0]
    if family not in RUNTIME_VERSIONS:
        raise ValueError(f"no default runtime version for {accelerator_type!r}; "
                         f"pass --runtime-version (known: {', '.join(RUNTIME_VERSIONS)})")
    return RUNTIME_VERSIONS[family]


# --------------------------------------------------------------------------------------------
# Command builders: one small function per action
# --------------------------------------------------------------------------------------------
def _common(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    return flags + ([f"--project={args.project}"] if args.project else [])


def _ssh(args: argparse.Namespace, script: str, worker: str = "all") -> list[str]:
    return GCLOUD_TPU + ["ssh", args.name, *_common(args), f"--worker={worker}",
                         f"--command={script}"]


def _create(args: argparse.Namespace) -> list[list[str]]:
    version = args.runtime_version or default_runtime_version(args.type)
    cmd = GCLOUD_TPU + ["create", args.name, *_common(args), f"--accelerator-type={args.type}",
                        f"--version={version}"]
    cmd += ["--spot"] if args.spot else []
    cmd += ["--preemptible"] if args.preemptible else []
    return [cmd]


def local_tarball(args: argparse.Namespace) -> str:
    return str(Path(tempfile.gettempdir()) / f"jaxttt-src-{args.name}.tar.gz")


def setup_script(args: argparse.Namespace) -> str:
    """Worker-side install: unpack the source, make a Python venv with uv, install jax[tpu].

    TPU VM images ship Python 3.10; uv fetches the Python this package needs.
    """
    python = f"{REMOTE_VENV}/bin/python"
    extras = f"[{args.extras}]" if args.extras else ""
    steps = [
        "set -e",
        "command -v uv >/dev/null || [ -x $HOME/.local/bin/uv ] || "
        "python3 -m pip install --user -q uv",
        'export PATH="$HOME/.local/bin:$PATH"',
        f"rm -rf {REMOTE_SRC}",
        f"mkdir -p {REMOTE_SRC}",
        f"tar -xzf $HOME/{REMOTE_TARBALL} -C {REMOTE_SRC}",
        f"[ -x {python} ] || uv venv --python {args.python} {REMOTE_VENV}",
        f"cd {REMOTE_SRC}",
        f'uv pip install --python {python} -e ".{extras}" "jax[tpu]"',  # one resolve: pins hold
        f'{python} -c "import jax, jaxttt; print(jax.__version__, jaxttt.__version__)"',
    ]
    return "; ".join(steps)


def _setup(args: argparse.Namespace) -> list[list[str]]:
    tarball = local_tarball(args)
    archive = ["git", "archive", "--format=tar.gz", "-o", tarball, args.ref]  # run from the repo
    scp = GCLOUD_TPU + ["scp", tarball, f"{args.name}:{REMOTE_TARBALL}", *_common(args),
                        "--worker=all"]
    return [archive, scp, _ssh(args, setup_script(args))]


def jaxttt_subcommand(command: Sequence[str]) -> str | None:
    """`discover` of `jaxttt discover ...` or `python -m jaxttt.cli discover ...`, else None."""
    words = list(command)
    if words and Path(words[0]).name == "jaxttt":
        return words[1] if len(words) > 1 else None
    for i, word in enumerate(words[:-2]):
        if word == "-m" and words[i + 1] == "jaxttt.cli":
            return words[i + 2]
    return None


def remote_command(args: argparse.Namespace) -> list[str]:
    """The user's command, plus `<ckpt-key>=<ckpt-dir>` when --ckpt-dir is given."""
    if not args.command:
        raise ValueError("run: give the command after `--`, e.g. -- jaxttt pretrain --config ...")
    sub = jaxttt_subcommand(args.command)
    if args.ckpt_dir and args.ckpt_key == "ckpt_dir" and sub not in (None, "pretrain"):
        raise ValueError(f"--ckpt-dir appends ckpt_dir=... which only `jaxttt pretrain` reads; "
                         f"`jaxttt {sub}` writes its run to its --out directory (on a "
                         "multi-host slice, a directory every worker shares)")
    extra = [f"{args.ckpt_key}={args.ckpt_dir}"] if args.ckpt_dir else []
    return list(args.command) + extra


def run_script(args: argparse.Namespace) -> str:
    """Worker-side start: refuse if a run is live, else start the command in its own session."""
    log, pid = f"{REMOTE_LOG_DIR}/{args.log_name}.log", f"{REMOTE_LOG_DIR}/{args.log_name}.pid"
    env = ["JAXTTT_COORDINATOR=auto", *args.env]
    steps = [
        f"mkdir -p {REMOTE_LOG_DIR}",
        f'if [ -f {pid} ] && kill -0 -- -"$(cat {pid})" 2>/dev/null; then '
        'echo "jaxttt is already running on $(hostname); use stop first" >&2; exit 1; fi',
        f"cd {REMOTE_SRC}",
        f'export PATH="{REMOTE_VENV}/bin:$PATH" {" ".join(map(shlex.quote, env))}',
        # setsid: the run leads its own process group, which `stop` signals as a whole
        f"setsid nohup {shlex.join(remote_command(args))} > {log} 2>&1 < /dev/null & "
        f"echo $! > {pid}",
        f'echo "started on $(hostname): pid $(cat {pid}), log {log}"',
    ]
    return "; ".join(steps)


def _run(args: argparse.Namespace) -> list[list[str]]:
    return [_ssh(args, run_script(args))]


def _logs(args: argparse.Namespace) -> list[list[str]]:
    follow = " -F" if args.follow else ""
    log = f"{REMOTE_LOG_DIR}/{args.log_name}.log"
    return [_ssh(args, f"tail -n {args.lines}{follow} {log}", worker=args.worker)]


def stop_script(args: argparse.Namespace) -> str:
    """Worker-side stop: TERM the run's process group, KILL it after 10 s, sweep stragglers."""
    pid = f"{REMOTE_LOG_DIR}/{args.log_name}.pid"
    steps = [
        f'if [ -f {pid} ]; then G="$(cat {pid})"; kill -TERM -- -"$G" 2>/dev/null; '
        f'for i in $(seq 10); do kill -0 -- -"$G" 2>/dev/null || break; sleep 1; done; '
        f'kill -KILL -- -"$G" 2>/dev/null; rm -f {pid}; fi',
        f'pkill -KILL -f "{PKILL_PATTERN}"',  # runs started some other way
        'echo "stopped on $(hostname)"',
    ]
    return "; ".join(steps)


def _stop(args: argparse.Namespace) -> list[list[str]]:
    return [_ssh(args, stop_script(args))]


def _delete(args: argparse.Namespace) -> list[list[str]]:
    return [GCLOUD_TPU + ["delete", args.name, *_common(args), "--quiet"]]


_BUILDERS = {"create": _create, "setup": _setup, "run": _run, "logs": _logs, "stop": _stop,
             "delete": _delete}


def build_commands(action: str, args: argparse.Namespace) -> list[list[str]]:
    """The argv lists that carry out `action` (run in order; gcloud unless noted)."""
    if action not in _BUILDERS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    return _BUILDERS[action](args)


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------
class GcloudNotFound(RuntimeError):
    pass


def require_gcloud() -> str:
    path = shutil.which("gcloud")
    if path is None:
        raise GcloudNotFound("`gcloud` is not on PATH: install the Google Cloud SDK "
                             "(https://cloud.google.com/sdk/docs/install) and run "
                             "`gcloud auth login`, or use --dry-run to print the commands")
    return path


def execute(commands: list[list[str]]) -> int:
    """Run `commands` in order, stopping at the first failure; returns its exit status."""
    require_gcloud()
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, cwd=REPO_ROOT).returncode
        if rc:
            return rc
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.tpu",
        usage="%(prog)s {create,setup,run,logs,stop,delete} --name NAME --zone ZONE "
              "[options] [-- COMMAND...]",
        description="Create, set up, run on, and delete a Cloud TPU VM slice with gcloud. "
                    "Put the command for `run` after `--`.",
        epilog="Default runtime versions: " +
               ", ".join(f"{k}-*: {v}" for k, v in RUNTIME_VERSIONS.items()) +
               " (override with --runtime-version). See launch/README.md.")
    p.add_argument("action", choices=ACTIONS, help="what to do")
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="zone, e.g. us-central2-b (v4), us-west4-a (v5e)")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's config)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    g = p.add_argument_group("create")
    g.add_argument("--type", default="v4-8", help="accelerator type, e.g. v4-8, v5litepod-16")
    g.add_argument("--runtime-version", default=None,
                   help="TPU VM software version (default from --type)")
    cap = g.add_mutually_exclusive_group()
    cap.add_argument("--spot", action="store_true", help="spot capacity (cheap, preemptible)")
    cap.add_argument("--preemptible", action="store_true", help="legacy preemptible capacity")
    g = p.add_argument_group("setup")
    g.add_argument("--ref", default="HEAD", help="git ref to ship with `git archive` "
                                                 "(commit first: uncommitted edits are not sent)")
    g.add_argument("--python", default="3.11", help="Python version of the worker venv")
    g.add_argument("--extras", default="dev", help="package extras to install ('' for none)")
    g = p.add_argument_group("run / logs / stop")
    g.add_argument("--ckpt-dir", default=None, help="gs:// run directory, appended to the "
                                                    "command as <ckpt-key>=<ckpt-dir>")
    g.add_argument("--ckpt-key", default="ckpt_dir", help="config key for --ckpt-dir")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the run (repeatable)")
    g.add_argument("--log-name", default="run",
                   help="log file on each worker: ~/jaxttt-logs/<name>.log")
    g.add_argument("--worker", default="all", help="workers for `logs` (all, 0, 1-3, ...)")
    g.add_argument("--lines", type=int, default=100, help="lines `logs` shows")
    g.add_argument("--follow", "-f", action="store_true", help="keep streaming the logs")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `argv` (options, then `--` and the command for `run`)."""
    opts, command = split_command(argv)
    args = build_parser().parse_args(opts)
    args.command = command
    return args


def _check(args: argparse.Namespace) -> None:
    if not re.fullmatch(r"[\w,-]*", args.extras):
        raise ValueError(f"--extras expects names separated by commas, got {args.extras!r}")
    bad = [e for e in args.env if "=" not in e]
    if bad:
        raise ValueError(f"--env expects KEY=VALUE, got {bad}")
    if args.command and args.action != "run":
        raise ValueError(f"a command after `--` is only used by `run`, not `{args.action}`")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _check(args)
        commands = build_commands(args.action, args)
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in commands))
            return 0
        return execute(commands)
    except (ValueError, GcloudNotFound) as e:
        print(f"launch.tpu: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
