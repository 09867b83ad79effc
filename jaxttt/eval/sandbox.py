"""Run untrusted Python (model-written code) in a restricted subprocess.

Each call starts `python -I -S -B` in a fresh temporary directory (its cwd, HOME and TMPDIR)
with a minimal environment, in its own session (process group), under resource limits:
CPU seconds, address space, file size, open files, processes, no core dumps. Before the
candidate runs, the child installs an audit hook (`sys.addaudithook`, hooks cannot be removed)
that refuses: process creation (fork, exec, spawn, system, Popen, posix_spawn), signals to
other processes, sockets, raising resource limits, ctypes and other interpreter back doors,
tracing, heap walking, and any write, delete, rename or chmod outside the temporary directory
(plus device files and /proc). stdout/stderr go to anonymous files, capped by RLIMIT_FSIZE,
and only a prefix of `max_output` bytes is read back. A wall-clock timeout kills the whole
process group.

Test results (`run_tests`) are reported through a private file descriptor as one random
token per passed test; the tokens live only in a reporting audit hook's closure, so printing
or writing a fake marker earns nothing, and reading the results file reveals only tokens of
tests that already passed.

Threat model: this stops accidents and naive reward hacks (fork bombs, infinite loops, huge
outputs, deleting files, network calls, forged result lines). It is not a security boundary
against a determined attacker inside the same interpreter (e.g. a signal handler firing while
the reporter runs, or crafted bytecode): for adversarial code at scale use a container or
gVisor/nsjail. Note: running as root, RLIMIT_NPROC does not apply (the kernel exempts root);
the audit hook is then what stops fork bombs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time

# The child-side harness. It is not secret (it is passed with -c); the secrets (result
# tokens) arrive on an inherited, anonymous file that the harness reads once and closes.
_HARNESS = r'''
import os, sys

def _limits(resource, lim):
    pairs = (("RLIMIT_CPU", lim["cpu_s"], lim["cpu_s"] + 1),
             ("RLIMIT_AS", lim["as_bytes"], lim["as_bytes"]),
             ("RLIMIT_FSIZE", lim["fsize_bytes"], lim["fsize_bytes"]),
             ("RLIMIT_NOFILE", lim["nofile"], lim["nofile"]),
             ("RLIMIT_NPROC", lim["nproc"], lim["nproc"]), ("RLIMIT_CORE", 0, 0))
    for name, soft, hard in pairs:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError):
            pass  # e.g. NPROC below the user's current count: keep going with the others

def _reporter(tokens, fd, frame, getframe, write, gc):
    # Writes tokens[i] when the harness frame `frame` audits ("jaxttt.report", i). Never
    # raises, never touches candidate objects before checking the caller, runs with the
    # cyclic GC paused so no candidate finaliser can run (and see this frame) in between.
    # Builtins are captured: the candidate may rebind names in the builtins module.
    disable, enable, isenabled = gc.disable, gc.enable, gc.isenabled
    _type, _len, _int, _str, _Base = type, len, int, str, BaseException
    def hook(event, args):
        if _type(event) is not _str or event != "jaxttt.report":
            return
        was = isenabled()
        disable()
        try:
            if getframe(1) is frame:
                i = args[0]
                if _type(i) is _int and 0 <= i < _len(tokens):
                    write(fd, tokens[i])
        except _Base:
            pass
        finally:
            if was:
                enable()
    return hook

_BLOCKED_EVENTS = frozenset((
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.startfile",
    "os.kill", "os.killpg", "os.link", "os.symlink", "subprocess.Popen", "pty.spawn",
    "resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
    "sys._current_frames", "sys._current_exceptions", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "cpython.PyInterpreterState_New", "cpython._PySys_ClearAuditHooks",
    "webbrowser.open", "ftplib.connect", "http.client.connect", "smtplib.connect",
    "poplib.connect", "imaplib.open", "telnetlib.Telnet.open", "urllib.Request", "sys.addaudithook",
))
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "_ctypes.", "winreg.", "msvcrt.")
_BLOCKED_MODULES = frozenset((
    "ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing", "_multiprocessing",
    "socket", "_socket", "ssl", "_ssl", "pty", "_xxsubinterpreters",
    "_xxinterpchannels", "_testcapi", "_testinternalcapi", "_testmultiphase", "_testbuffer",
    "_testimportmultiple", "_testclinic", "_tkinter", "urllib.request", "http.client", "ftplib",
    "smtplib", "webbrowser", "_lsprof", "cProfile", "profile", "pdb", "bdb",
))
_PATH_EVENTS = {  # event -> indices of path arguments that must stay inside the sandbox
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.chmod": (0,),
    "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "os.chflags": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1),
}
_FD_OK = frozenset(("os.truncate",))  # events where an int (an fd already held) is fine
_DIR_FD_ARGS = {"os.remove": (1,), "os.rmdir": (1,), "os.mkdir": (2,), "os.rename": (2, 3),
                "os.chmod": (2,), "os.chown": (3,), "os.utime": (3,)}

class SandboxError(RuntimeError):
    pass

def _guard(root, posix, stat_mod):
    # The policy hook. Everything it uses is captured here (closure cells cannot be rebound),
    # so monkeypatching os, posixpath or builtins later cannot change the checks, and it only
    # looks at exact str/bytes/int arguments, so no candidate method runs inside it.
    getcwd, st = posix.getcwd, posix.stat
    S_ISDIR, S_ISCHR, S_ISBLK = stat_mod.S_ISDIR, stat_mod.S_ISCHR, stat_mod.S_ISBLK
    _type, _len, _str, _bytes, _int, _OSError, _Error = type, len, str, bytes, int, OSError, SandboxError
    blocked_events, blocked_prefixes, blocked_modules = _BLOCKED_EVENTS, _BLOCKED_PREFIXES, _BLOCKED_MODULES
    path_events, fd_ok, dir_fd_args = dict(_PATH_EVENTS), _FD_OK, dict(_DIR_FD_ARGS)
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    prefix = root.rstrip("/") + "/"
    created = [0]

    def norm(path):
        if _type(path) is _bytes:
            path = path.decode("utf-8", "surrogateescape")  # the child runs in UTF-8 mode
        if _type(path) is not _str or "\x00" in path:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                return None  # refuse rather than guess what a dir_fd-relative ".." means
            if part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts)

    def inside(path):
        p = norm(path)
        return p is not None and (p + "/").startswith(prefix)

    def check_open(path, flags):
        if _type(path) is _int:
            return  # an fd the process already holds
        p = norm(path)
        if p is None:
            raise _Error("open: unsupported path")
        if p == "/proc" or p.startswith("/proc/") or p.startswith("/dev/fd"):
            raise _Error("open: /proc is not available")
        try:
            mode = st(p).st_mode
        except _OSError:
            mode = None
        if mode is not None and (S_ISCHR(mode) or S_ISBLK(mode)) and p not in DEVICES:
            raise _Error("open: device files are not available")
        in_root = (p + "/").startswith(prefix)
        if _type(flags) is _int and flags & WRITE:
            if not in_root:
                raise _Error("open: writing outside the sandbox directory")
            created[0] += 1
            if created[0] > 256:
                raise _Error("open: too many files opened for writing")
        elif mode is not None and S_ISDIR(mode) and not in_root:
            raise _Error("open: directory handles outside the sandbox are not available")

    def hook(event, args):
        if _type(event) is not _str:
            raise _Error("audit: bad event")
        if event in blocked_events or event.startswith(blocked_prefixes):
            raise _Error(event + " is not allowed in the sandbox")
        if event == "import":
            name = args[0]
            if _type(name) is not _str:
                raise _Error("import: bad module name")
            if name in blocked_modules or name.split(".")[0] in blocked_modules:
                raise _Error("import of " + name + " is not allowed in the sandbox")
        elif event == "open":
            check_open(args[0], args[2] if _len(args) > 2 else None)
        elif event in path_events:
            for i in path_events[event]:
                arg = args[i] if i < _len(args) else None
                if arg is None or (_type(arg) is _int and event in fd_ok):
                    continue
                if not inside(arg):
                    raise _Error(event + ": path outside the sandbox directory")
            for i in dir_fd_args.get(event, ()):
                if i < _len(args) and args[i] is not None and not (_type(args[i]) is _int and args[i] == -1):
                    raise _Error(event + ": dir_fd is not allowed")
    return hook

def _main():
    import builtins, gc, json, posix, resource, stat
    cfg_fd, res_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while True:
        b = os.read(cfg_fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(cfg_fd)
    cfg = json.loads(b"".join(chunks))
    del chunks, b
    _limits(resource, cfg["limits"])
    mode, root = cfg["mode"], cfg["root"]
    names = {name for name in dir(builtins)}
    pristine = tuple(builtins.__dict__.items())
    audit, run_exec, run_compile, exit_now = sys.audit, exec, compile, os._exit
    tests = []
    for i, src in enumerate(cfg["tests"]):
        try:
            tests.append(run_compile(src, "<test%d>" % i, "exec"))
        except BaseException:
            tests.append(None)
    tests = tuple(tests)
    code = cfg["code"]
    n_tests = len(tests)
    sys.addaudithook(_reporter(tuple(t.encode() + b"\n" for t in cfg.pop("tokens")), res_fd,
                               sys._getframe(), sys._getframe, os.write, gc))
    sys.addaudithook(_guard(root, posix, stat))
    del cfg
    ns = {"__name__": "__main__" if mode == "script" else "candidate", "__builtins__": builtins}
    try:
        run_exec(run_compile(code, "<candidate>", "exec"), ns)
    except SystemExit:
        if mode == "script":
            raise
        sys.stderr.write("candidate raised SystemExit\n")
    except BaseException:
        sys.__excepthook__(*sys.exc_info())
        if mode == "script":
            sys.stdout.flush()
            exit_now(1)
    for i in range(n_tests):
        if tests[i] is None:
            continue
        tns = {k: v for k, v in ns.items() if k not in names}
        tns["__builtins__"] = dict(pristine)
        try:
            run_exec(tests[i], tns)
        except BaseException:
            continue
        audit("jaxttt.report", i)
    audit("jaxttt.report", n_tests)  # completion token
    if mode == "script":
        return  # normal interpreter exit (atexit handlers, non-daemon threads) under the timeout
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    exit_now(0)

_main()
'''


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int  # negative: killed by that signal
    stdout: str  # at most max_output bytes, decoded with errors replaced
    stderr: str
    timed_out: bool  # wall-clock limit reached (the process group was killed)
    killed: bool  # ended by a signal (timeout, CPU limit, ...)
    truncated: bool  # stdout or stderr was longer than max_output
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock
    cpu_s: int | None = None  # RLIMIT_CPU; None = ceil(timeout_s)
    memory_mb: int = 256  # RLIMIT_AS
    max_output: int = 64_000  # bytes of stdout/stderr read back
    file_mb: int = 16  # RLIMIT_FSIZE: largest file (stdout included) the child may write
    nofile: int = 64  # RLIMIT_NOFILE
    nproc: int = 512  # RLIMIT_NPROC (ignored by the kernel for root; see module doc)

    def child(self) -> dict:
        cpu = self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))
        return {"cpu_s": int(cpu), "as_bytes": self.memory_mb << 20, "fsize_bytes": self.file_mb << 20,
                "nofile": self.nofile, "nproc": self.nproc}


def _env(root: str) -> dict[str, str]:
    # Minimal: no proxies, no PYTHON* variables (-I ignores them anyway), no credentials.
    return {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the child to exit *without reaping it*, so its pid (= its process group id)
    cannot be reused before we kill the group. Returns True when the deadline passed first."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel / not Linux): poll instead
        return _wait_polling(proc, timeout_s)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return not poller.poll(max(0, int(timeout_s * 1000)))
    finally:
        os.close(pidfd)


def _wait_polling(proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return False
        except ChildProcessError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(f, cap: int) -> tuple[str, bool]:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace"), size > cap


def _launch(mode: str, code: str, tests: list[str], tokens: list[str],
            limits: Limits) -> tuple[SandboxResult, bytes]:
    with tempfile.TemporaryDirectory(prefix="jaxttt-sbx-", ignore_cleanup_errors=True) as root, \
            tempfile.TemporaryFile() as cfg, tempfile.TemporaryFile() as res, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        root = os.path.realpath(root)
        cfg.write(json.dumps({"mode": mode, "root": root, "code": code, "tests": tests,
                              "tokens": tokens, "limits": limits.child()}).encode())
        cfg.flush()
        cfg.seek(0)
        cmd = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _HARNESS,
               str(cfg.fileno()), str(res.fileno())]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=root,
                                env=_env(root), pass_fds=(cfg.fileno(), res.fileno()),
                                start_new_session=True)
        try:
            timed_out = _wait(proc, limits.timeout_s)
        finally:
            _kill_group(proc.pid)  # also removes anything the child left behind
            proc.wait()
        wall = time.monotonic() - t0
        stdout, t1 = _read_capped(out, limits.max_output)
        stderr, t2 = _read_capped(err, limits.max_output)
        res.seek(0)
        report = res.read(limits.file_mb << 20)
    rc = proc.returncode
    return SandboxResult(returncode=rc, stdout=stdout, stderr=stderr, timed_out=timed_out,
                         killed=rc < 0, truncated=t1 or t2, wall_s=wall), report


def run_python(code: str, *, timeout_s: float = 5.0, cpu_s: int | None = None, memory_mb: int = 256,
               max_output: int = 64_000, file_mb: int = 16) -> SandboxResult:
    """Run `code` as a script (`__name__ == "__main__"`) in the sandbox."""
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_output=max_output,
                    file_mb=file_mb)
    result, _ = _launch("script", code, [], [secrets.token_hex(16)], limits)
    return result


def run_tests(code: str, tests: list[str], *, timeout_s: float = 5.0, cpu_s: int | None = None,
              memory_mb: int = 256, max_output: int = 64_000,
              file_mb: int = 16) -> tuple[int, int, dict]:
    """Run candidate `code` (module name `candidate`), then each test snippet (usually one
    `assert`) in its namespace, in one sandboxed process.

    A test passes when it runs without raising. Tests see the candidate's globals except
    names that shadow builtins, and a fresh copy of the original builtins. Returns
    (passed, total, details) with details = {"passed": [bool per test], "completed": bool
    (the harness reached the end), "timed_out", "returncode", "stderr" (capped), "wall_s"}.
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_output=max_output,
                    file_mb=file_mb)
    tokens = [secrets.token_hex(16) for _ in range(len(tests) + 1)]
    result, report = _launch("tests", code, list(tests), tokens, limits)
    seen = set(report.decode("ascii", errors="replace").split())
    passed = [t in seen for t in tokens[:-1]]
    details = {"passed": passed, "completed": tokens[-1] in seen, "timed_out": result.timed_out,
               "returncode": result.returncode, "stderr": result.stderr, "wall_s": result.wall_s}
    return sum(passed), len(tests), details
