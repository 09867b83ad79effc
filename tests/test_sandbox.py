"""The code sandbox: honest code scores, values cross as genuine built-ins, and every hostile
candidate in tests/hostile/ scores 0 and leaves the host as it was.

Expected values in the hostile runs are random tokens that only the test process holds, so the
only way to score is to forge. The host checks: a canary directory (contents, modes, times), a
127.0.0.1 TCP listener and UDP socket (nothing may arrive), a victim process (alive, same nice
value and CPU affinity), the host's temporary directory and HOME (no new names), and no
processes left behind.
"""
import fcntl
import logging
import os
import secrets
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from jaxttt.eval import sandbox, wire
from jaxttt.eval.sandbox import Limits, SandboxUnavailable, evaluate, run_python, run_tests

HOSTILE = sorted((Path(__file__).parent / "hostile").glob("*.py"))
SLACK = 3.0  # process start, kill and read-back on a loaded 2-core machine


def _children() -> set[int]:
    """Live or zombie processes whose parent is this test process."""
    me, kids = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                kids.add(int(entry))
    return kids


@pytest.fixture
def no_leftovers():
    before = _children()
    yield
    assert _children() <= before, "the sandbox left processes behind"


# ---- honest candidates -------------------------------------------------------------------------
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2.5, 0.5) == 3.0",
             "assert add('a', 'b') == 'ab'"]


def test_correct_and_half_correct(no_leftovers):
    passed, total, details = run_tests("def add(a, b):\n    return a + b\n", ADD_TESTS)
    assert (passed, total) == (4, 4) and details["completed"] and details["confined"]
    passed, _, details = run_tests("def add(a, b):\n    return int(a) + int(b)\n", ADD_TESTS)
    assert passed == 2 and details["passed"] == [True, True, False, False]


def test_ordinary_stdlib_code_runs(no_leftovers):
    code = (
        "import collections, dataclasses, functools, itertools, json, math, re, sqlite3, threading\n"
        "@dataclasses.dataclass(frozen=True)\nclass Pair:\n    a: object\n    b: object\n"
        "def add(a, b):\n"
        "    open('scratch.txt', 'w').write(json.dumps([a, b]))  # its own /tmp is writable\n"
        "    db = sqlite3.connect(':memory:'); db.execute('create table t(x)')\n"
        "    t = threading.Thread(target=math.sqrt, args=(4,)); t.start(); t.join()\n"
        "    return functools.reduce(lambda x, y: x + y, [Pair(a, b).a, Pair(a, b).b])\n")
    passed, total, details = run_tests(code, ADD_TESTS)
    assert passed == total, details


def test_values_cross_as_genuine_builtins(no_leftovers):
    code = ("def f(x):\n    return (x, [x], {x: (1, 2.5)}, {1, 2}, frozenset([3]), b'\\x00', 1 + 2j, None, True)\n"
            "def g():\n    raise ValueError('bad')\n"
            "class E(Exception):\n    pass\n"
            "def h():\n    raise E('custom')\n"
            "LIMIT = [1, 2]\n")
    tests = [
        "r = f('k')\nassert type(r) is tuple and len(r) == 9\n"
        "assert r == ('k', ['k'], {'k': (1, 2.5)}, {1, 2}, frozenset([3]), b'\\x00', 1 + 2j, None, True)\n"
        "assert [type(v) for v in r[:7]] == [str, list, dict, set, frozenset, bytes, complex]",
        "try:\n    g()\nexcept ValueError as e:\n    assert str(e) == 'bad'\nelse:\n    assert False",
        "try:\n    h()\nexcept ValueError:\n    assert False\nexcept Exception as e:\n    assert 'custom' in str(e)",
        "assert LIMIT == [1, 2] and type(LIMIT) is list",
    ]
    r = evaluate(code, tests)
    assert r.passed == (True, True, True, True), r


def test_humaneval_style_check_with_alias_and_trusted_helpers(no_leftovers):
    setup = ("def helper(x):\n    return x * 10\n"
             "def solve(x):\n    '''stub from the prompt'''\n"
             "def check(candidate):\n    assert candidate(2) == helper(2) + 1\n")
    # the candidate redefines the benchmark's helper: the test keeps the trusted one
    code = "def helper(x):\n    return 0\ndef solve(x):\n    return x * 10 + 1\n"
    r = evaluate(code, ["check(candidate)"], setup=setup, entry_points=("solve",), alias="solve")
    assert r.passed == (True,)
    r = evaluate("def helper(x):\n    return 0\ndef solve(x):\n    return helper(x) + 1\n",
                 ["check(candidate)"], setup=setup, entry_points=("solve",), alias="solve")
    assert r.passed == (False,)


def test_a_crash_cannot_be_caught_by_the_test(no_leftovers):
    tests = ["try:\n    add(1, 1)\nexcept BaseException:\n    pass",  # swallows everything
             "assert add(1, 2) == 3"]
    r = evaluate("import os\ndef add(a, b):\n    os._exit(0)\n", tests)
    assert r.passed == (False, False) and "exited" in (r.error or "")
    r = evaluate("def add(a, b):\n    return a + b\n", tests)
    assert r.passed == (True, True)


def test_load_errors_and_timeouts_fail_every_test(no_leftovers):
    r = evaluate("def add(a, b):\n    return (\n", ADD_TESTS)
    assert r.n_passed == 0 and "SyntaxError" in r.error
    t0 = time.monotonic()
    r = evaluate("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, limits=Limits(timeout_s=1.0))
    assert r.n_passed == 0 and r.timed_out and time.monotonic() - t0 < 1.0 + SLACK


def test_script_mode_and_what_the_confined_process_sees(no_leftovers):
    r = run_python("import sys\nprint('hi')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert (r.returncode, r.stdout, r.stderr) == (3, "hi\n", "err\n")
    r = run_python("while True:\n    print('y' * 1000)", timeout_s=1.0, max_output=10_000, file_mb=1)
    assert r.truncated and len(r.stdout) == 10_000 and not r.ok  # stopped by the file-size limit or the clock
    probe = (
        "import os, socket\n"
        "def refused(f):\n    try:\n        f()\n        return False\n    except OSError:\n        return True\n"
        "print(os.getcwd(), os.environ.get('HOME'), sorted(os.listdir('.')))\n"
        "print(refused(lambda: socket.socket()), refused(os.fork), refused(lambda: open('/etc/passwd')),\n"
        "      refused(lambda: os.listdir('/proc')), refused(lambda: os.execv('/bin/true', ['true'])))\n"
        "import importlib.util, sysconfig\n"  # site-packages are not readable: installed packages stay out
        "print(refused(lambda: os.listdir(sysconfig.get_paths()['purelib'])), importlib.util.find_spec('pytest'))\n"
        "print([fd for fd in range(3, 1024) if not refused(lambda: os.fstat(fd))])\n"  # nothing inherited
        "open('/tmp/x', 'w').write('ok')\nprint(open('/tmp/x').read())\n")
    r = run_python(probe)
    assert r.ok, r.stderr
    assert r.stdout.splitlines() == ["/tmp /tmp []", "True True True True True", "True None", "[]", "ok"]


def test_what_it_may_read_under_tmp_stays_readable_and_read_only(no_leftovers):
    """A venv or a Python installed under /tmp: the private tmpfs on /tmp would hide its packages
    (every discovery program failed to import numpy). They are mounted back read-only; the rest
    of the host's /tmp stays out of sight."""
    pkg, other = Path(tempfile.mkdtemp(dir="/tmp")), Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        (pkg / "kept_mod.py").write_text("VALUE = 42\n")
        (other / "secret").write_text("host")
        (other / "lone.txt").write_text("a file on its own")  # readable by itself, its directory not
        probe = (
            "import os, sys\n"
            "def refused(f):\n    try:\n        f()\n        return False\n    except OSError:\n        return True\n"
            f"sys.path.insert(0, {str(pkg)!r})\nimport kept_mod\nprint(kept_mod.VALUE)\n"
            f"p = {str(pkg)!r}\n"
            "print(refused(lambda: open(p + '/new', 'w')), refused(lambda: os.remove(p + '/kept_mod.py')),\n"
            "      refused(lambda: open(p + '/kept_mod.py', 'a')), refused(lambda: os.chmod(p, 0o777)),\n"
            f"      refused(lambda: open({str(other / 'secret')!r})))\n"
            f"print(open({str(other / 'lone.txt')!r}).read(), refused(lambda: open({str(other / 'lone.txt')!r}, 'a')))\n"
            "print(sorted(os.listdir('/tmp')))\n")
        r = sandbox._run_script(probe, Limits(), sandbox.check_confinement(),
                                extra_read=(str(pkg), str(other / "lone.txt")))
        assert r.ok, r.stderr
        assert r.stdout.splitlines() == ["42", "True True True True True", "a file on its own True",
                                         str(sorted([pkg.name, other.name]))]
        assert sorted(p.name for p in pkg.iterdir()) == ["kept_mod.py"]
        assert sorted(p.name for p in other.iterdir()) == ["lone.txt", "secret"]
        assert (other / "lone.txt").read_text() == "a file on its own"
        assert (pkg / "kept_mod.py").read_text() == "VALUE = 42\n" and pkg.stat().st_mode & 0o777 == 0o700
    finally:
        sandbox.remove_tree(str(pkg))
        sandbox.remove_tree(str(other))


# ---- plain data across the boundary -----------------------------------------------------------
def test_wire_round_trip_and_refusals():
    value = {"a": [1, 2.5, None, True], (1, "x"): {frozenset({1}), 3}, b"k": 1 - 2j, "n": float("inf")}
    assert wire.decode(wire.encode(value)[4:]) == value
    for bad in (type("S", (str,), {})("x"), object(), [lambda: 0], {"k": type("I", (int,), {})(1)}):
        with pytest.raises(wire.WireError):
            wire.encode(bad)
    nested = []
    for _ in range(wire.MAX_DEPTH + 5):
        nested = [nested]
    with pytest.raises(wire.WireError):
        wire.encode(nested)
    for garbage in (b"{", b'{"x": 1}', b'{"l": 3}', b'{"s": [{"l": []}]}', b'{"d": [[{"l": []}, 1]]}',
                    b"[" * 100_000, b'{"b": "zz"}', b"9" * 5000):
        with pytest.raises(wire.WireError):
            wire.decode(garbage)


# ---- hostile candidates ----------------------------------------------------------------------
class _Host:
    """What a candidate must not touch, and the checks that it did not."""

    def __init__(self, root: Path):
        self.canary = root / "canary"
        self.canary.mkdir()
        (self.canary / "secret.txt").write_text("tok-" + secrets.token_hex(16))
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.tcp.settimeout(0.05)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.05)
        self.victim = subprocess.Popen(["sleep", "120"])
        self.mark = "jaxttt-hostile-" + secrets.token_hex(6)
        self.snapshot = self._state()

    def fill(self, source: str) -> str:
        return (source.replace("__CANARY__", str(self.canary))
                .replace("__PORT__", str(self.tcp.getsockname()[1]))
                .replace("__UDP__", str(self.udp.getsockname()[1]))
                .replace("__VICTIM__", str(self.victim.pid)).replace("__MARK__", self.mark))

    def _state(self):
        files = {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
                 for p in self.canary.iterdir()}
        return (files, self.canary.stat().st_mode, os.getpriority(os.PRIO_PROCESS, self.victim.pid),
                os.sched_getaffinity(self.victim.pid), os.sched_getscheduler(self.victim.pid))

    def assert_untouched(self):
        assert self.victim.poll() is None, "the victim process was killed"
        assert self._state() == self.snapshot, "host files or the victim process were changed"
        with pytest.raises(OSError):  # socket.timeout
            self.tcp.accept()
        with pytest.raises(OSError):
            self.udp.recv(100)
        assert not (Path(tempfile.gettempdir()) / self.mark).exists()
        assert not (Path.home() / ("." + self.mark)).exists()
        assert not [p for p in Path(tempfile.gettempdir()).glob("jaxttt-unsafe-*")]

    def close(self):
        self.victim.kill()
        self.victim.wait()
        self.tcp.close()
        self.udp.close()


@pytest.fixture
def host(tmp_path):
    h = _Host(tmp_path)
    yield h
    h.close()


@pytest.mark.parametrize("path", HOSTILE, ids=[p.stem for p in HOSTILE])
def test_hostile_candidate_scores_zero_and_leaves_the_host_untouched(path, host, no_leftovers):
    tokens = ["tok-" + secrets.token_hex(16) for _ in range(3)]
    tests = [f"assert add({i}, {i}) == {tok!r}" for i, tok in enumerate(tokens)]
    t0 = time.monotonic()
    r = evaluate(host.fill(path.read_text()), tests, limits=Limits(timeout_s=2.0))
    assert r.confined and time.monotonic() - t0 < 2.0 + SLACK
    assert r.passed == (False, False, False), (path.stem, r)
    if path.stem == "escape_late":
        time.sleep(1.5)  # its thread would have acted by now
    host.assert_untouched()


def test_hostile_code_env_reward_is_zero(host, no_leftovers):
    from jaxttt.discover.env import safe_reward
    from jaxttt.discover.envs import CodeTestsEnv

    env = CodeTestsEnv(timeout_s=2.0)  # the built-in rle problem
    for path in HOSTILE[:4]:
        code = host.fill(path.read_text()).replace("def add(a, b):", "def rle(s):")
        state, reward, _ = safe_reward(env, f"```python\n{code}```", timeout_s=10.0)
        assert reward == 0.0, path.stem
    host.assert_untouched()


# ---- cleanup and the unsafe path ---------------------------------------------------------------
def test_remove_tree_clears_immutable_files(tmp_path):
    root = tmp_path / "box"
    (root / "d").mkdir(parents=True)
    f = root / "d" / "locked"
    f.write_text("x")
    fd = os.open(f, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, sandbox.FS_IOC_SETFLAGS, struct.pack("i", 0x10))  # chattr +i
    except OSError as e:
        pytest.skip(f"this filesystem/user cannot set the immutable flag ({e})")
    finally:
        os.close(fd)
    os.chmod(root / "d", 0o500)
    with pytest.raises(OSError):
        f.unlink()
    sandbox.remove_tree(str(root))
    assert not root.exists()


@pytest.fixture
def no_confinement(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_result", ["simulated: this kernel has no namespaces"])
    monkeypatch.setattr(sandbox, "_warned", [])


def test_refuses_without_confinement_unless_unsafe_is_explicit(no_confinement, caplog, no_leftovers):
    with pytest.raises(SandboxUnavailable, match="unsafe-local-exec.*|.*simulated"):
        evaluate("def add(a, b):\n    return a + b\n", ADD_TESTS)
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)")
    with caplog.at_level(logging.WARNING, logger="jaxttt.eval.sandbox"):
        r = evaluate("def add(a, b):\n    return a + b\n", ADD_TESTS, unsafe_local_exec=True)
    assert r.passed == (True,) * 4 and not r.confined
    assert any("UNSAFE" in rec.message for rec in caplog.records)


def test_unsafe_mode_still_uses_two_processes(no_confinement, no_leftovers):
    code = "import sys\ndef add(a, b):\n    return (a + b) if 'check' not in sys.modules else 0\n"
    r = evaluate(code, ["assert add(1, 2) == 3"], unsafe_local_exec=True)
    assert r.passed == (True,)
    r = evaluate((Path(__file__).parent / "hostile" / "forge_eq_always_true.py").read_text(),
                 ["assert add(1, 2) == 'tok'"] * 3, unsafe_local_exec=True)
    assert r.passed == (False,) * 3


def test_concurrent_evaluations_do_not_interfere(no_leftovers):
    results = [None] * 6

    def work(i):
        code = f"def add(a, b):\n    return a + b + {i}\n"
        results[i] = evaluate(code, [f"assert add(1, 1) == {2 + i}", "assert add(0, 0) == 0"]).passed

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(True, True)] + [(True, False)] * 5


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_nothing_outlives_a_killed_host_process(tmp_path, no_leftovers):
    """The evaluating process is SIGKILLed mid-run: the candidate (sleeping, so no CPU limit
    would ever stop it), its pid-1 child and the test process die with it."""
    import sys
    pids = tmp_path / "pids"
    script = f"""
import os, threading, time
from jaxttt.eval import sandbox
sandbox.confinement_problem()
spawned = []
real = sandbox._spawn
def spy(*a, **k):
    proc = real(*a, **k)
    spawned.append(proc.pid)
    return proc
sandbox._spawn = spy
def record_and_die():
    family = list(spawned)
    for pid in spawned:
        try:
            family += [int(c) for c in open(f"/proc/{{pid}}/task/{{pid}}/children").read().split()]
        except OSError:
            pass
    open({str(pids)!r}, "w").write(" ".join(map(str, family)))
    os.kill(os.getpid(), 9)
threading.Timer(3.0, record_and_die).start()
sandbox.evaluate("import time\\ndef add(a, b):\\n    time.sleep(60)\\n", ["add(1, 2)"],
                 limits=sandbox.Limits(timeout_s=30))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], timeout=60)
    family = [int(p) for p in pids.read_text().split()]
    assert proc.returncode == -9 and len(family) >= 3  # candidate, its pid-1 child, test process
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in family if _alive(p)], "a sandbox process outlived its evaluator"
