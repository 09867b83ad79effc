"""The two child programs of the sandbox: the confined candidate and the test runner.

Compiled by the parent together with wire.py (and confine.py for the candidate) and run by a
tiny bootstrap in `python -I -S -B -c` (see `jaxttt.eval.sandbox`) with the globals `ROLE`,
`CONFIG` (a JSON object) and `FDS` (the channel descriptors).

- `candidate IN OUT`: confine the process, run the candidate's code, then serve calls:
  read {"f": name, "a": args, "k": kwargs} on IN, answer {"r": value} or
  {"x": [exception type name, message]} on OUT. In script mode it only runs the code.
- `tests TO FROM RESULTS`: run the trusted `setup` source (e.g. a HumanEval prompt and its
  `check`), bind each name the candidate defines to a `Remote` proxy, run each test snippet in a
  fresh copy of that namespace, and write "P i" / "F i" per test and "D" at the end to RESULTS.
  The candidate's answers are rebuilt as genuine built-ins by `decode`; a crash, an exit, a
  malformed answer or a protocol violation breaks the channel and fails that test and every
  later one, even if the test code catches the exception.
"""
import builtins
import json
import os
import resource
import sys
import types


def _unconfined_setup(cfg: dict, keep: tuple) -> None:
    """--unsafe-local-exec: only rlimits, a private cwd and closed fds. No kernel boundary."""
    os.chdir(cfg["workdir"])
    set_limits(cfg["limits"], strict=False)  # noqa: F821 - from confine.py, sent before this file
    close_fds(keep)  # noqa: F821


# ---- the candidate side ----------------------------------------------------------------------
def _exported(ns: dict) -> dict:
    """name -> "call" for callables, ["v", value] for plain-data globals."""
    out = {}
    for name, value in list(ns.items()):
        if type(name) is not str or name.startswith("__"):
            continue
        if callable(value):
            out[name] = "call"
        else:
            try:
                to_tree(value)  # noqa: F821 - wire.py
                out[name] = ["v", value]
            except Exception:  # noqa: BLE001 - not plain data: not exported
                pass
    return out


def _answer(ns: dict, req) -> dict:
    try:
        fn = ns[req["f"]]
        return {"r": fn(*req["a"], **req["k"])}
    except BaseException as e:  # noqa: BLE001 - reported to the test side as an exception
        return {"x": [type(e).__name__, str(e)[:2000]]}


def candidate_main(cfg: dict, channel: tuple) -> None:
    """Script mode has no channel; serve mode has (IN, OUT)."""
    die_with_parent(cfg["parent_pid"])  # noqa: F821 - confine.py
    if cfg["confine"]:
        confine(cfg, channel)  # noqa: F821
    else:
        _unconfined_setup(cfg, channel)
    source, script = cfg["code"], cfg["mode"] == "script"
    module = types.ModuleType("__main__" if script else "candidate")  # real: dataclasses, pickle
    sys.modules[module.__name__] = module
    ns = module.__dict__
    ns["__builtins__"] = builtins
    del cfg
    if script:
        exec(compile(source, "<candidate>", "exec"), ns)
        return
    in_fd, out_fd = channel
    try:
        exec(compile(source, "<candidate>", "exec"), ns)
        hello = {"names": _exported(ns)}
    except BaseException as e:  # noqa: BLE001
        hello = {"load_error": f"{type(e).__name__}: {str(e)[:2000]}"}
    write_frame(out_fd, hello)  # noqa: F821
    while True:
        try:
            req = read_frame(in_fd)  # noqa: F821
        except EOFError:
            os._exit(0)
        reply = _answer(ns, req)
        try:
            frame = encode(reply)  # noqa: F821
        except Exception as e:  # noqa: BLE001 - the result is not plain data
            frame = encode({"x": ["TypeError", f"result is not plain data ({e})"]})  # noqa: F821
        data = memoryview(frame)
        while data:
            data = data[os.write(out_fd, data):]


# ---- the test side ---------------------------------------------------------------------------
class CandidateGone(BaseException):
    """The candidate crashed, exited, timed out or broke the protocol (not catchable as Exception)."""


class CandidateError(Exception):
    """The candidate raised an exception that has no plain built-in equivalent."""


class Channel:
    def __init__(self, to_fd: int, from_fd: int):
        self.to_fd, self.from_fd = to_fd, from_fd
        self.broken = None  # the reason, once broken

    def fail(self, why: str):
        if self.broken is None:
            self.broken = why
        raise CandidateGone(self.broken)

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.broken is not None:
            raise CandidateGone(self.broken)
        frame = encode({"f": name, "a": args, "k": kwargs})  # noqa: F821 - WireError: the test's fault
        try:
            data = memoryview(frame)
            while data:
                data = data[os.write(self.to_fd, data):]
            reply = read_frame(self.from_fd)  # noqa: F821
        except (OSError, EOFError) as e:
            self.fail(f"candidate exited ({type(e).__name__})")
        except WireError as e:  # noqa: F821
            self.fail(f"malformed answer ({e})")
        if type(reply) is not dict or len(reply) != 1:
            self.fail("protocol violation")
        if "r" in reply:
            return reply["r"]
        x = reply.get("x")
        if type(x) is not list or len(x) != 2 or type(x[0]) is not str or type(x[1]) is not str:
            self.fail("protocol violation")
        raise _rebuild_exception(*x)


def _rebuild_exception(name: str, message: str) -> Exception:
    cls = getattr(builtins, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - constructors with other signatures
            pass
    return CandidateError(f"{name}: {message}")


class Remote:
    """Stands for the candidate's function `name`; calls cross the channel as plain data."""

    def __init__(self, channel: Channel, name: str):
        self._channel, self.__name__ = channel, name

    def __call__(self, *args, **kwargs):
        return self._channel.call(self.__name__, args, kwargs)

    def __repr__(self):
        return f"<candidate function {self.__name__}>"


def _bind_candidate(ns: dict, names: dict, channel: Channel, entry_points: list, alias: str | None):
    """Put the candidate's names into the test namespace: never over a builtin name, and over a
    name the trusted setup defined only for the entry points (HumanEval's helpers stay the
    benchmark's own)."""
    for name, kind in names.items():
        if type(name) is not str or not name.isidentifier() or hasattr(builtins, name) \
                or (name in ns and name not in entry_points):
            continue
        if kind == "call":
            ns[name] = Remote(channel, name)
        elif type(kind) is list and len(kind) == 2 and kind[0] == "v":
            ns[name] = kind[1]
    if alias is not None:
        ns["candidate"] = ns.get(alias) if isinstance(ns.get(alias), Remote) else _missing(alias)


def _missing(name: str):
    def missing(*args, **kwargs):
        raise NameError(f"the candidate does not define {name}")
    return missing


def tests_main(cfg: dict, fds: tuple) -> None:
    to_fd, from_fd, res_fd = fds
    cpu = cfg["limits"]["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    channel = Channel(to_fd, from_fd)

    def report(line: str) -> None:
        os.write(res_fd, (line + "\n").encode())

    try:
        hello = read_frame(from_fd)  # noqa: F821
    except (OSError, EOFError, WireError) as e:  # noqa: F821
        hello = {"load_error": f"no answer from the candidate ({type(e).__name__})"}
    if type(hello) is not dict or type(hello.get("names")) is not dict:
        err = hello.get("load_error") if type(hello) is dict else None
        report("E " + json.dumps(str(err or "protocol violation")[:500]))
        report("D")
        return
    ns = {"__name__": "__tests__", "__builtins__": builtins}
    exec(compile(cfg["setup"], "<setup>", "exec"), ns)
    _bind_candidate(ns, hello["names"], channel, cfg["entry_points"], cfg["alias"])
    for i, src in enumerate(cfg["tests"]):
        try:
            exec(compile(src, f"<test{i}>", "exec"), dict(ns))
            ok = channel.broken is None
        except BaseException:  # noqa: BLE001 - any failure is a failed test
            ok = False
        report(("P " if ok else "F ") + str(i))
    if channel.broken is not None:
        report("E " + json.dumps(channel.broken))
    report("D")


def main() -> None:
    cfg = json.loads(CONFIG)  # noqa: F821 - set by the bootstrap
    (candidate_main if ROLE == "candidate" else tests_main)(cfg, FDS)  # noqa: F821
