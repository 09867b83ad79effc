"""Run untrusted (model-written) Python against tests it cannot reach.

Two processes per evaluation, both fresh `python -I -S -B` interpreters started from here:

- the **candidate** process runs the candidate's code under kernel confinement
  (`jaxttt.eval.confine`: user/mount/pid/net/IPC/UTS namespaces, a private size-limited tmpfs
  as /tmp, rlimits, no capabilities, Landlock, seccomp) and then answers calls over a pipe;
- the **test** process runs the trusted test code (assert snippets, or a benchmark's
  `check(candidate)`) with proxies (`Remote`) in place of the candidate's functions: a call
  crosses the pipe as plain data and its result comes back rebuilt as genuine built-ins
  (`jaxttt.eval.wire`). The candidate never shares an interpreter, memory or a namespace with
  the tests, and cannot see, signal or connect to the test process.

The test process reports each test's outcome to this process on its own pipe; the candidate
has no descriptor for it, and nothing the candidate prints or writes is read for scoring. A
test passes only when the test process says so; a candidate that crashes, exits, hangs past
`timeout_s` or answers garbage fails that test and all later ones.

Where the kernel cannot confine (not Linux, no unprivileged user namespaces, Landlock < ABI 6,
no libseccomp), every entry point raises `SandboxUnavailable` unless the caller passes
`unsafe_local_exec=True`, which runs the same two processes with rlimits only (and logs a
warning): use it only for code you trust.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import logging
import marshal
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

UNSAFE_FLAG = "--unsafe-local-exec"
_CHILD_SOURCES = {"candidate": ("wire.py", "confine.py", "sandbox_child.py"),
                  "tests": ("wire.py", "sandbox_child.py")}  # the test process needs no ctypes


class SandboxUnavailable(RuntimeError):
    """Kernel confinement is not available here and unsafe local execution was not requested."""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock for the whole evaluation (both processes)
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s)
    memory_mb: int = 256  # RLIMIT_AS of the candidate
    file_mb: int = 16  # RLIMIT_FSIZE: largest file (its stdout included)
    tmp_mb: int = 32  # size of its private /tmp
    tmp_inodes: int = 256  # files + directories in its /tmp
    nofile: int = 64  # RLIMIT_NOFILE
    nproc: int = 16  # RLIMIT_NPROC: threads (new processes are refused outright when confined)
    max_output: int = 64_000  # bytes of the candidate's stdout/stderr kept for diagnostics

    def child(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))
        return {"cpu_s": int(cpu), "as_bytes": self.memory_mb << 20, "fsize_bytes": self.file_mb << 20,
                "nofile": self.nofile, "nproc": self.nproc, "tmp_mb": self.tmp_mb,
                "tmp_inodes": self.tmp_inodes}


@dataclasses.dataclass(frozen=True)
class TestsResult:
    passed: tuple[bool, ...]  # one per test
    completed: bool  # the test process reached the end
    error: str | None  # why the candidate failed as a whole (load error, exit, timeout, ...)
    timed_out: bool
    stderr: str  # the candidate's, capped; for diagnostics only
    wall_s: float
    confined: bool

    @property
    def n_passed(self) -> int:
        return sum(self.passed)

    @property
    def fraction(self) -> float:
        return self.n_passed / len(self.passed) if self.passed else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal
    stdout: str  # at most max_output bytes, decoded with errors replaced
    stderr: str
    timed_out: bool
    killed: bool
    truncated: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# ---- can we confine? ---------------------------------------------------------------------------
# The child reads its code (compiled here once, marshalled) and its config from one file.
_BOOTSTRAP = """import marshal, os, sys
fd = int(sys.argv[2])
chunks = []
while True:
    b = os.read(fd, 1 << 20)
    if not b:
        break
    chunks.append(b)
os.close(fd)
data = b"".join(chunks)
n = int.from_bytes(data[:4], "big")
exec(marshal.loads(data[4:4 + n]), {"__name__": "__sandbox__", "ROLE": sys.argv[1],
     "CONFIG": data[4 + n:], "FDS": tuple(int(a) for a in sys.argv[3:])})
"""


@functools.lru_cache(maxsize=2)
def _program(role: str) -> bytes:
    here = Path(__file__).parent
    source = "\n".join((here / name).read_text() for name in _CHILD_SOURCES[role]) + "\nmain()\n"
    return marshal.dumps(compile(source, f"<sandbox {role}>", "exec"))


_probe_lock = threading.Lock()
_probe_result: list = []
_warned: list = []  # the unsafe-mode warning is logged once per process


def confinement_problem() -> str | None:
    """None when untrusted code can be confined here, else the reason (probed once)."""
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_probe())
        return _probe_result[0]


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"no kernel confinement on {sys.platform} (needs Linux namespaces, Landlock, seccomp)"
    # Inside, a socket must be refused and the host's /etc unreadable.
    code = ("import socket\ntry:\n    socket.socket()\n    raise SystemExit(3)\nexcept OSError:\n    pass\n"
            "try:\n    open('/etc/passwd').close()\n    raise SystemExit(4)\nexcept OSError:\n    pass\n")
    r = _run_script(code, Limits(timeout_s=20.0), confined=True)
    if r.ok:
        return None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    why = lines[-1] if lines else f"exit status {r.returncode}"
    return f"kernel confinement failed here: {why}"


def check_confinement(unsafe_local_exec: bool = False) -> bool:
    """True when code will run confined. Without confinement: False (and a logged warning) if
    `unsafe_local_exec`, else SandboxUnavailable with the reason."""
    problem = confinement_problem()
    if problem is None:
        return True
    if not unsafe_local_exec:
        raise SandboxUnavailable(
            f"refusing to run untrusted code: {problem}. Pass {UNSAFE_FLAG} (env option "
            "unsafe_local_exec: true) to run it unconfined, with rlimits only, if you trust it")
    if not _warned:
        _warned.append(True)
        log.warning("UNSAFE: running model-written code without kernel confinement (%s)", problem)
    return False


# ---- launching ---------------------------------------------------------------------------------
def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _spawn(role: str, cfg: dict, fds: tuple[int, ...], stdout, stderr, home: str) -> subprocess.Popen:
    code = _program(role)
    with tempfile.TemporaryFile() as cfg_file:
        cfg_file.write(len(code).to_bytes(4, "big") + code + json.dumps(cfg).encode())
        cfg_file.flush()
        cfg_file.seek(0)
        argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP, role,
                str(cfg_file.fileno()), *map(str, fds)]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                env=_env(home), pass_fds=(cfg_file.fileno(), *fds), start_new_session=True)


def _candidate_cfg(code: str, mode: str, limits: Limits, confined: bool, workdir: str | None,
                   extra_read: Sequence[str] = ()) -> dict:
    """`extra_read`: paths it may read besides the standard library (read-only)."""
    return {"code": code, "mode": mode, "limits": limits.child(), "confine": confined,
            "workdir": workdir, "parent_pid": os.getpid(), "extra_read": list(extra_read)}


def _kill(proc: subprocess.Popen) -> None:
    """Kill the process group while the leader is still unreaped (its pid cannot be reused)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_capped(f, cap: int) -> tuple[str, bool]:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace"), size > cap


class _Workdir:
    """The candidate's cwd: none on the host when confined (it gets a tmpfs); a temporary
    directory removed afterwards, immutable files included, when not."""

    def __init__(self, confined: bool):
        self.path = None if confined else tempfile.mkdtemp(prefix="jaxttt-unsafe-")

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        if self.path is not None:
            remove_tree(self.path)


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20


def _clear_flags(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        buf = bytearray(fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8))
        flags = int.from_bytes(buf[:4], "little")
        if flags & (_FS_IMMUTABLE_FL | _FS_APPEND_FL):
            flags &= ~(_FS_IMMUTABLE_FL | _FS_APPEND_FL)
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(4, "little") + b"\0" * 4)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """rm -rf that also clears immutable/append-only flags (chattr +i/+a) and read-only modes."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    for root, dirs, files in os.walk(path, topdown=True):
        for name in [*dirs, *files, ""]:
            p = os.path.join(root, name) if name else root
            if not os.path.islink(p):
                _clear_flags(p)
                try:
                    os.chmod(p, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not remove the sandbox directory %s", path)


def _collect(res_fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything the test process reports until it closes the pipe or the deadline passes."""
    poller = select.poll()
    poller.register(res_fd, select.POLLIN)
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
            return b"".join(chunks), True
        b = os.read(res_fd, 1 << 16)
        if not b:
            return b"".join(chunks), False
        chunks.append(b)


def _parse_report(report: bytes, n: int) -> tuple[list[bool], bool, str | None]:
    passed, completed, error = [False] * n, False, None
    for line in report.decode("utf-8", "replace").splitlines():
        tag, _, rest = line.partition(" ")
        if tag in ("P", "F") and rest.isdigit() and int(rest) < n:
            passed[int(rest)] = tag == "P"
        elif tag == "E":
            error = json.loads(rest)
        elif tag == "D":
            completed = True
    return passed, completed, error


def evaluate(code: str, tests: list[str], *, setup: str = "", entry_points: tuple[str, ...] = (),
             alias: str | None = None, limits: Limits = Limits(),
             unsafe_local_exec: bool = False) -> TestsResult:
    """Run `code` in a confined candidate process and each of `tests` in a separate test process.

    The test process first runs the trusted `setup` source once; each test then runs in a copy
    of that namespace in which every function the candidate defines is a `Remote` proxy (names
    of builtins are never replaced, and names `setup` defines only if listed in `entry_points`);
    with `alias`, `candidate` names the proxy of that function (HumanEval's `check(candidate)`).
    A test passes when it runs to the end without raising and the candidate stayed healthy.
    """
    confined = check_confinement(unsafe_local_exec)
    t0 = time.monotonic()
    (req_r, req_w), (rep_r, rep_w), (res_r, res_w) = (os.pipe() for _ in range(3))
    open_fds = {req_r, req_w, rep_r, rep_w, res_r, res_w}  # each closed exactly once (threads reuse numbers)

    def close(*fds: int) -> None:
        for fd in fds:
            if fd in open_fds:
                open_fds.discard(fd)
                os.close(fd)

    with _Workdir(confined) as workdir, tempfile.TemporaryFile() as err:
        procs = []
        try:
            cand_cfg = _candidate_cfg(code, "serve", limits, confined, workdir)
            procs.append(_spawn("candidate", cand_cfg, (req_r, rep_w), subprocess.DEVNULL, err,
                                workdir or "/tmp"))
            test_cfg = {"setup": setup, "tests": list(tests), "entry_points": list(entry_points),
                        "alias": alias, "limits": limits.child()}
            procs.append(_spawn("tests", test_cfg, (req_w, rep_r, res_w), subprocess.DEVNULL,
                                subprocess.DEVNULL, tempfile.gettempdir()))
            close(req_r, rep_w, req_w, rep_r, res_w)
            report, timed_out = _collect(res_r, t0 + limits.timeout_s)
        finally:
            for p in procs:
                _kill(p)
            close(*list(open_fds))
        stderr, _ = _read_capped(err, limits.max_output)
    passed, completed, error = _parse_report(report, len(tests))
    if timed_out and error is None:
        error = f"timeout after {limits.timeout_s:g}s"
    return TestsResult(passed=tuple(passed), completed=completed and not timed_out, error=error,
                       timed_out=timed_out, stderr=stderr, wall_s=time.monotonic() - t0,
                       confined=confined)


def run_tests(code: str, tests: list[str], *, timeout_s: float = 5.0, cpu_s: int | None = None,
              memory_mb: int = 256, max_output: int = 64_000, file_mb: int = 16,
              unsafe_local_exec: bool = False) -> tuple[int, int, dict]:
    """(passed, total, details) for assert-snippet `tests` against candidate `code`.

    details = {"passed": [bool per test], "completed", "timed_out", "error", "stderr" (the
    candidate's, capped), "wall_s", "confined"}."""
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_output=max_output,
                    file_mb=file_mb)
    r = evaluate(code, tests, limits=limits, unsafe_local_exec=unsafe_local_exec)
    details = {"passed": list(r.passed), "completed": r.completed, "timed_out": r.timed_out,
               "error": r.error, "stderr": r.stderr, "wall_s": r.wall_s, "confined": r.confined}
    return r.n_passed, len(tests), details


# ---- scripts -----------------------------------------------------------------------------------
def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for exit without reaping (the pid stays ours for the kill). True on timeout."""
    if not hasattr(os, "pidfd_open"):  # macOS (unsafe local mode only)
        deadline = time.monotonic() + timeout_s
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.005)
        return False
    pidfd = os.pidfd_open(proc.pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return not poller.poll(max(0, int(timeout_s * 1000)))
    finally:
        os.close(pidfd)


def _run_script(code: str, limits: Limits, confined: bool, extra_read: tuple[str, ...] = ()) -> SandboxResult:
    with _Workdir(confined) as workdir, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = _spawn("candidate", _candidate_cfg(code, "script", limits, confined, workdir, extra_read), (),
                      out, err, workdir or "/tmp")
        try:
            timed_out = _wait(proc, limits.timeout_s)
        finally:
            _kill(proc)
        wall = time.monotonic() - t0
        stdout, t1 = _read_capped(out, limits.max_output)
        stderr, t2 = _read_capped(err, limits.max_output)
    rc = proc.returncode
    return SandboxResult(returncode=rc, stdout=stdout, stderr=stderr, timed_out=timed_out,
                         killed=rc < 0, truncated=t1 or t2, wall_s=wall)


def run_python(code: str, *, timeout_s: float = 5.0, cpu_s: int | None = None, memory_mb: int = 256,
               max_output: int = 64_000, file_mb: int = 16, unsafe_local_exec: bool = False) -> SandboxResult:
    """Run `code` as a script (`__name__ == "__main__"`) in a confined process; its output is
    returned for the caller to look at (scores must come from `evaluate`, not from output)."""
    confined = check_confinement(unsafe_local_exec)
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_output=max_output,
                    file_mb=file_mb)
    return _run_script(code, limits, confined)
