"""The code sandbox: correct code scores, hostile code scores 0 within its limits and leaves the
machine as it was. Hostile snippets are bounded (a fork "bomb" of 3 forks, ...) so that even a
broken sandbox could not hurt the shared test machine."""
import os
import socket
import textwrap
import time

import pytest

from jaxttt.eval.sandbox import run_python, run_tests

TESTS = [
    "assert add(1, 2) == 3",
    "assert add(-1, 1) == 0",
    "assert add(2.5, 0.5) == 3.0",
    "assert add('a', 'b') == 'ab'",
]
TIMEOUT = 1.5
SLACK = 2.0  # process start, kill and read-back on a loaded 2-core machine


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


def score(code: str, tests=TESTS, timeout_s=TIMEOUT) -> tuple[float, dict]:
    t0 = time.monotonic()
    passed, total, details = run_tests(code, tests, timeout_s=timeout_s)
    assert time.monotonic() - t0 < timeout_s + SLACK
    return passed / total, details


# ---- honest candidates --------------------------------------------------------------------
def test_correct_and_half_correct(no_leftovers):
    full, details = score("def add(a, b):\n    return a + b\n")
    assert full == 1.0 and details["completed"] and details["passed"] == [True] * 4
    half, details = score("def add(a, b):\n    return int(a) + int(b)\n")  # floats and strs fail
    assert half == 0.5 and details["passed"] == [True, True, False, False]


def test_ordinary_stdlib_code_is_not_blocked(no_leftovers):
    code = textwrap.dedent("""
        import collections, dataclasses, functools, heapq, itertools, json, math, re, typing
        Pair = collections.namedtuple("Pair", "a b")
        T = typing.TypeVar("T")

        @dataclasses.dataclass
        class Box:
            v: int

        @functools.lru_cache(None)
        def add(a, b):
            open("scratch.txt", "w").write(json.dumps([a, b]))  # the sandbox dir is writable
            return Pair(a, b).a + Box(b).v
    """)
    assert score(code)[0] == 1.0


def test_run_python_script_semantics(no_leftovers):
    r = run_python("import sys\nprint('hi')\nprint('err', file=sys.stderr)\nsys.exit(3)", timeout_s=TIMEOUT)
    assert (r.returncode, r.stdout, r.stderr.strip(), r.timed_out) == (3, "hi\n", "err", False)
    r = run_python("if __name__ == '__main__':\n    raise ValueError('boom')", timeout_s=TIMEOUT)
    assert r.returncode == 1 and "ValueError: boom" in r.stderr
    r = run_python("import os\nprint(os.getcwd() == os.environ['HOME'], 'http_proxy' in os.environ)")
    assert r.ok and r.stdout.strip() == "True False"


# ---- hostile candidates -------------------------------------------------------------------
def test_infinite_loop_is_killed(no_leftovers):
    s, details = score("def add(a, b):\n    return a + b\nwhile True:\n    pass\n")
    assert s == 0.0 and details["timed_out"] and not details["completed"]


def test_loop_inside_a_test_keeps_earlier_passes(no_leftovers):
    code = "def add(a, b):\n    while isinstance(a, str):\n        pass\n    return a + b\n"
    s, details = score(code)
    assert s == 0.75 and details["timed_out"] and details["passed"] == [True, True, True, False]


def test_fork_bomb_is_blocked(no_leftovers):
    r = run_python("import os\nfor _ in range(3):\n    pid = os.fork()\n    print('forked', pid)",
                   timeout_s=TIMEOUT)
    assert r.returncode != 0 and "forked" not in r.stdout and "os.fork" in r.stderr
    spin = ("import os\ndef add(a, b):\n    return a + b\n"
            "while True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n")
    s, details = score(spin)
    assert s == 0.0 and details["timed_out"]
    for code in ("import subprocess\nsubprocess.run(['true'])",
                 "import multiprocessing\nmultiprocessing.Process(target=print).start()",
                 "import os\nos.posix_spawn('/bin/true', ['true'], {})",
                 "import os\nos.execv('/bin/true', ['true'])",
                 "import pty\npty.fork()"):
        r = run_python(code, timeout_s=TIMEOUT)
        assert r.returncode == 1 and "SandboxError" in r.stderr, code


def test_huge_output_is_capped(no_leftovers):
    s, _ = score("print('x' * 10**9)\ndef add(a, b):\n    return a + b\n")
    assert s == 0.0  # MemoryError under RLIMIT_AS before anything is printed
    r = run_python("while True:\n    print('y' * 1000)", timeout_s=TIMEOUT, max_output=10_000)
    assert r.truncated and len(r.stdout) == 10_000 and set(r.stdout) <= {"y", "\n"}
    assert r.returncode != 0  # stopped by RLIMIT_FSIZE (EFBIG) or the timeout
    s, details = score("import sys\ndef add(a, b):\n    return a + b\n"
                       "while True:\n    try:\n        sys.stdout.write('z' * 65536)\n"
                       "    except OSError:\n        pass\n")
    assert s == 0.0 and details["timed_out"]


def test_writes_outside_the_sandbox_fail(tmp_path, no_leftovers):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    evil = tmp_path / "evil.txt"
    attempts = [
        f"open({str(evil)!r}, 'w').write('x')",
        f"import pathlib\npathlib.Path({str(evil)!r}).write_text('x')",
        f"import os\nos.system('touch {evil}')",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        f"os.open('evil.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('evil.txt', 'w')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import os\nos.chmod({str(victim)!r}, 0o777)",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/evil.txt', 'w')",
        f"import os\nos.mkdir('d')\nopen('d/../../evil.txt', 'w')",
        # rebinding what a naive policy hook would call does not loosen it
        f"import builtins, os, posixpath\nbuiltins.type = lambda x: int\nbuiltins.len = lambda x: 0\n"
        f"os.fspath = posixpath.realpath = lambda p: 'inside'\nopen({str(evil).encode()!r}, 'wb')",
    ]
    for attack in attempts:
        s, details = score(attack + "\ndef add(a, b):\n    return a + b\n")
        assert s == 0.0 and "SandboxError" in details["stderr"], attack
    assert not evil.exists() and victim.read_text() == "keep me"
    assert oct(victim.stat().st_mode & 0o777) != oct(0o777)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_no_network(no_leftovers):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     "import _socket",
                     f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}')"):
            r = run_python(code, timeout_s=TIMEOUT)
            assert r.returncode == 1 and "SandboxError" in r.stderr, code
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


def test_memory_hog(no_leftovers):
    s, _ = score("x = bytearray(2 * 1024**3)\ndef add(a, b):\n    return a + b\n")
    assert s == 0.0
    s, _ = score("def add(a, b):\n    chunks = []\n    while True:\n        chunks.append(bytearray(10**7))\n")
    assert s == 0.0


def test_other_escapes_are_refused(no_leftovers):
    for code in ("import os\nos.kill(os.getppid(), 9)",
                 "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
                 "import ctypes",
                 "print(open('/proc/self/environ').read())",
                 "import sys\nsys.settrace(lambda *a: None)",
                 "import _imp\nfrom importlib.machinery import ModuleSpec\n"
                 "_imp.create_builtin(ModuleSpec('gc', None)).get_objects()"):
        r = run_python(code, timeout_s=TIMEOUT)
        assert r.returncode == 1 and "SandboxError" in r.stderr, code


def test_results_cannot_be_forged(no_leftovers):
    # Wrong answers; the candidate prints marker-like lines, walks every reachable frame for
    # hex strings and writes them (and guesses) to every file descriptor, then exits early.
    code = textwrap.dedent("""
        import os, re, sys
        def add(a, b):
            found = set()
            f = sys._getframe()
            while f is not None:
                found.update(re.findall(r"[0-9a-f]{32}", repr(f.f_locals)))
                f = f.f_back
            for fd in range(3, 32):
                for tok in sorted(found) + ["PASS 0", "0 1", "ok"]:
                    try:
                        os.write(fd, (tok + "\\n").encode())
                    except OSError:
                        pass
            print("PASS 0\\nPASS 1\\nPASS 2\\nPASS 3")
            return None
    """)
    s, details = score(code + "\nadd(0, 0)\n")
    assert s == 0.0
    s, details = score("import os\nprint('PASS ' * 10)\nos._exit(0)\ndef add(a, b):\n    return a + b\n")
    assert s == 0.0 and not details["completed"]
