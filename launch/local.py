"""Local multi-process launcher: N processes on 127.0.0.1 with emulated CPU devices.

    python -m launch.local -n 2 --devices-per-process 4 -- jaxttt pretrain --config ...

Each process gets the environment `jaxttt.sharding.init_distributed()` reads
(JAXTTT_COORDINATOR=127.0.0.1:PORT, JAXTTT_NUM_PROCESSES, JAXTTT_PROCESS_ID) plus
JAX_PLATFORMS=cpu and XLA_FLAGS with the device count, so the same command that runs on a TPU
slice (where launch/tpu.py sets JAXTTT_COORDINATOR=auto) runs here over gloo. Output is
streamed with a `[pI]` prefix, whole lines only: stdout and stderr come through separate pipes,
so a library writing to stderr in pieces (gloo does) cannot split a line the program prints.
If one process fails, the others are killed (each child leads its own process group, so its
children go too) and the launcher returns non-zero.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_RC = 124  # like coreutils `timeout`
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _xla_flags(existing: str, devices: int) -> str:
    """`existing` XLA_FLAGS with any device-count flag replaced by ours."""
    kept = re.sub(rf"{_DEVICE_FLAG}=\S*", "", existing).split()
    return " ".join(kept + [f"{_DEVICE_FLAG}={devices}"])


def child_env(base: dict[str, str], *, rank: int, n: int, port: int,
              devices_per_process: int) -> dict[str, str]:
    """Environment of process `rank`: distributed vars, CPU platform, repo on PYTHONPATH."""
    env = dict(base)
    pythonpath = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update({
        "JAXTTT_COORDINATOR": f"127.0.0.1:{port}",
        "JAXTTT_NUM_PROCESSES": str(n),
        "JAXTTT_PROCESS_ID": str(rank),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": _xla_flags(env.get("XLA_FLAGS", ""), devices_per_process),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
        "PYTHONUNBUFFERED": "1",  # stream lines as they are printed
    })
    return env


def _pump(stream: TextIO, prefix: str, out: TextIO, log: TextIO | None,
          lock: threading.Lock) -> None:
    """Copy one of a child's streams to `out` (prefixed) and to its log file, line by line."""
    for line in stream:
        line = line if line.endswith("\n") else line + "\n"
        with lock:
            out.write(f"{prefix} {line}")
            out.flush()
            if log is not None:
                log.write(line)
                log.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every child's process group, then SIGKILL what is left after `grace` s."""
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:  # also reaps grandchildren that ignored SIGTERM
        _signal_group(p, signal.SIGKILL)
        p.wait()


def _exit_code(rc: int) -> int:
    """A shell-style status: killed by signal S -> 128 + S."""
    return 128 - rc if rc < 0 else rc


def _wait(procs: list[subprocess.Popen], timeout: float | None) -> tuple[int | None, int]:
    """Poll until all exit, one fails, or time runs out: (failed rank or None, status)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        for rank, rc in enumerate(codes):
            if rc not in (None, 0):
                return rank, _exit_code(rc)
        if all(rc == 0 for rc in codes):
            return None, 0
        if deadline is not None and time.monotonic() > deadline:
            return None, TIMEOUT_RC
        time.sleep(0.05)


def _start(cmd: Sequence[str], n: int, port: int, devices_per_process: int,
           cwd: Path, env: dict[str, str] | None) -> list[subprocess.Popen]:
    base = dict(os.environ if env is None else env)
    return [subprocess.Popen(list(cmd), cwd=cwd, text=True, bufsize=1, errors="replace",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True,
                             env=child_env(base, rank=i, n=n, port=port,
                                           devices_per_process=devices_per_process))
            for i in range(n)]


def launch_local(cmd: Sequence[str], n: int, devices_per_process: int = 1, *,
                 port: int | None = None, log_dir: str | Path | None = None,
                 timeout: float | None = None, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, out: TextIO | None = None,
                 kill_grace: float = 5.0) -> int:
    """Run `cmd` as `n` cooperating processes; 0 if all succeed, else the first failure's status.

    `env` replaces os.environ as the children's base environment; `out` receives the prefixed
    output (default sys.stdout); per-process logs go to `log_dir/p{i}.log`. On a failure,
    timeout (status 124) or Ctrl-C the other processes' groups are terminated.
    """
    if n < 1 or devices_per_process < 1:
        raise ValueError("need n >= 1 and devices_per_process >= 1")
    out = sys.stdout if out is None else out
    port = port or free_port()
    logs = _open_logs(log_dir, n)
    lock = threading.Lock()
    procs = _start(cmd, n, port, devices_per_process, Path(cwd or os.getcwd()), env)
    pumps = [threading.Thread(target=_pump, args=(stream, f"[p{i}]", out, logs[i], lock),
                              daemon=True)
             for i, p in enumerate(procs) for stream in (p.stdout, p.stderr)]
    for t in pumps:
        t.start()
    try:
        failed, status = _wait(procs, timeout)
    except KeyboardInterrupt:
        failed, status = None, 130
    _kill_all(procs, kill_grace)
    for t in pumps:
        t.join(timeout=5)
    for f in logs:
        if f is not None:
            f.close()
    _report(out, failed, status, timeout)
    return status


def _open_logs(log_dir: str | Path | None, n: int) -> list[TextIO | None]:
    if log_dir is None:
        return [None] * n
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return [open(Path(log_dir) / f"p{i}.log", "w") for i in range(n)]


def _report(out: TextIO, failed: int | None, status: int, timeout: float | None) -> None:
    if failed is not None:
        out.write(f"[launch] process {failed} failed with status {status}; stopped the others\n")
    elif status == TIMEOUT_RC:
        out.write(f"[launch] timed out after {timeout} s; stopped all processes\n")
    elif status:
        out.write(f"[launch] interrupted (status {status}); stopped all processes\n")
    out.flush()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split `argv` at the first `--` into (launcher options, command)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.local",
        usage="%(prog)s [-n N] [--devices-per-process D] [--port P] [--log-dir DIR] "
              "[--timeout S] -- COMMAND...",
        description="Run a command as N local JAX processes on 127.0.0.1 (gloo CPU "
                    "collectives), e.g. `python -m launch.local -n 2 --devices-per-process 4 "
                    "-- jaxttt pretrain --config CONFIG`.",
        epilog="Everything after `--` is the command; it should call "
               "jaxttt.sharding.init_distributed() at start (every `jaxttt` command does).")
    p.add_argument("-n", "--num-processes", type=int, default=2, help="processes (default 2)")
    p.add_argument("--devices-per-process", type=int, default=1,
                   help="emulated CPU devices per process (default 1)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--log-dir", default=None, help="also write each process's output to "
                                                   "LOG_DIR/p<i>.log")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before all processes are killed (status 124)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    opts, cmd = split_command(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(opts)
    if not cmd:
        parser.error("no command given: put it after `--`")
    return launch_local(cmd, args.num_processes, args.devices_per_process, port=args.port,
                        log_dir=args.log_dir, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
