"""The TTT-Discover paper's mathematical discovery problems as discovery envs.

- `circle_packing` (option `n`, default 26): n disjoint circles inside the unit square with the
  largest sum of radii. Reward = that sum for a valid packing, 0 otherwise. References (n = 26):
  AlphaEvolve 2.635, TTT-Discover 2.635977.
- `erdos_min_overlap`: an upper bound on Erdős' minimum overlap constant from a step function
  h: [0, 2] -> [0, 1] with integral 1 (n samples, dx = 2/n): C5 <= max_k sum_i h_i (1 - h_{i+k}) dx.
  Smaller is better; reward = 1 / C5, as the official code's entropic runs use. References:
  best human 0.380927, AlphaEvolve 0.380924, TTT-Discover 0.380876.
- `autocorrelation`: the paper's first autocorrelation inequality (AC1; the official
  `alphaevolve_ac` task): non-negative step heights a_0..a_{n-1} give the upper bound
  2n max_k (a*a)_k / (sum a)^2. Smaller is better; reward = 1 / bound. References: best human
  1.50973, AlphaEvolve 1.50314, TTT-Discover 1.50287.

The action is a Python program (the fenced block of the model's output) that defines the
problem's entry function. It runs in the confined sandbox (`jaxttt.eval.sandbox`: its own
process, kernel-confined) with numpy and scipy importable, the problem's checker predefined
and, for Erdős and AC1, the start state's construction given as a global, as in the official
code. Only the entry function's return value comes back, as plain data (`jaxttt.eval.wire`).
The verifiers here run on the host and trust nothing in it: exact built-in types, shapes, a
size cap, finiteness, every constraint re-checked and every quantity recomputed; a claimed
value that disagrees with the recomputed one makes the whole result invalid.

Time: the defaults (a program gets 8 s of wall clock, Erdős and AC1 programs are told
`budget_s` = 4) fit the discovery loop's default `reward_timeout_s` of 10 s on a small CPU
machine; the paper gave programs minutes. For longer budgets raise `reward_timeout_s` above
the env's `timeout_s`, or the loop stops waiting first (the program is still killed at its own
deadline).

A state is JSON {"code": program, "construction": verified construction, "output": the end of
what the program printed}: the code and the solution the paper's reuse carries forward, and the
output its prompts show back to the model. `reward(state)` re-verifies the construction (no
code runs); `transition_from(start, action)` runs the program against the
start state's construction.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import json
import math
import os
import select
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxttt.discover.env import DiscoveryEnv, EnvError, InvalidAction
from jaxttt.eval.humaneval import extract_code
from jaxttt.eval import sandbox, wire

if TYPE_CHECKING:
    from jaxttt.discover.archive import Archive


# ============================================================================================
# Verifiers. Plain data in; `Invalid` out for anything that is not a valid construction.
# The functions between the two markers are also sent to the candidate process as the checkers
# the prompts promise, so both sides judge a construction by the same code.
# ============================================================================================
# --- shipped to the candidate: begin ---
PACKING_TOL = 1e-12  # official validate_packing: boundary and overlap slack
PACKING_CLAIM_ATOL = 1e-6  # |claimed sum_radii - recomputed sum|
ERDOS_CLAIM_ATOL = 1e-4  # official verify_c5_solution: |claimed C5 - recomputed C5|
AC_MAX_HEIGHT = 1000.0  # official evaluate_sequence clamps heights to [0, 1000]
AC_MIN_SUM = 0.01  # ... and rejects sequences whose sum is below this
AC_DIRECT_MAX = 4096  # longer sequences: FFT screening, then exact sums at the candidate lags
AC_FFT_SLACK = 1e-8  # screening margin, relative to |a|^2


class Invalid(ValueError):
    """A result or construction that fails verification; the message says why."""


def real(x, what):
    """A finite float from an int or float (exact types: no bool, no subclass)."""
    if type(x) not in (int, float):
        raise Invalid(f"{what} must be a number, got {type(x).__name__}")
    try:
        v = float(x)
    except OverflowError:
        raise Invalid(f"{what} is too large") from None
    if not math.isfinite(v):
        raise Invalid(f"{what} is not finite ({v})")
    return v


def reals(seq, what, length=None, max_len=None):
    """A float64 vector from a list/tuple of finite ints/floats, of `length` or 1..`max_len`."""
    if type(seq) not in (list, tuple):
        raise Invalid(f"{what} must be a list of numbers, got {type(seq).__name__}")
    if length is not None and len(seq) != length:
        raise Invalid(f"{what} must have {length} entries, got {len(seq)}")
    if max_len is not None and not 1 <= len(seq) <= max_len:
        raise Invalid(f"{what} must have 1..{max_len} entries, got {len(seq)}")
    return np.array([real(v, what) for v in seq], dtype=np.float64)


def packing_sum(circles, n):
    """Sum of radii of `circles` = [[x, y, r]] * n if they are disjoint, inside the unit square
    and have radii >= 0 (all within PACKING_TOL, as the official validate_packing)."""
    if type(circles) not in (list, tuple) or len(circles) != n:
        raise Invalid(f"a packing must list {n} circles")
    xyr = np.stack([reals(c, "a circle [x, y, r]", length=3) for c in circles])
    x, y, r = xyr[:, 0], xyr[:, 1], xyr[:, 2]
    if (r < 0).any():
        raise Invalid(f"circle {int(np.argmax(r < 0))} has a negative radius")
    lo, hi = -PACKING_TOL, 1 + PACKING_TOL
    out = (x - r < lo) | (x + r > hi) | (y - r < lo) | (y + r > hi)
    if out.any():
        raise Invalid(f"circle {int(np.argmax(out))} is not inside the unit square")
    i, j = np.triu_indices(n, 1)
    dist = np.sqrt((x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2)
    overlap = dist < r[i] + r[j] - PACKING_TOL
    if overlap.any():
        k = int(np.argmax(overlap))
        raise Invalid(f"circles {int(i[k])} and {int(j[k])} overlap")
    return math.fsum(r.tolist())


def erdos_normalise(h_values, max_points):
    """h in [0, 1] rescaled to sum n/2 (integral 1 over [0, 2]), as the official verifier."""
    h = reals(h_values, "h_values", max_len=max_points)
    if (h < 0).any() or (h > 1).any():
        raise Invalid(f"h is not in [0, 1] (range [{h.min()}, {h.max()}])")
    total, target = float(np.sum(h)), len(h) / 2.0
    if total <= 0:
        raise Invalid("h sums to 0")
    if total != target:
        h = h * (target / total)
        if (h < 0).any() or (h > 1).any():
            raise Invalid(f"h is not in [0, 1] after scaling to integral 1 (max {h.max()})")
    return h


def erdos_bound(h):
    """C5 bound of a normalised step function: max_k (h correlated with 1 - h)_k * 2/n."""
    return float(np.max(np.correlate(h, 1.0 - h, mode="full") * (2.0 / len(h))))


def ac_heights(sequence, max_len):
    """Heights clamped to [0, AC_MAX_HEIGHT] with sum >= AC_MIN_SUM (official evaluate_sequence)."""
    a = np.clip(reals(sequence, "the sequence", max_len=max_len), 0.0, AC_MAX_HEIGHT)
    if float(np.sum(a)) < AC_MIN_SUM:
        raise Invalid(f"the heights sum to less than {AC_MIN_SUM}")
    return a


def ac_conv_max(a):
    """max_k (a*a)_k = max_k sum_i a_i a_(k-i). Long sequences: an FFT convolution picks every
    lag within AC_FFT_SLACK * |a|^2 of its maximum (FFT rounding is ~1e-15 |a|^2) and those lags
    are summed exactly, so the result is the direct one at a fraction of O(n^2)."""
    n = len(a)
    if n <= AC_DIRECT_MAX:
        return float(np.max(np.convolve(a, a)))
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(a, size)
    approx = np.fft.irfft(f * f, size)[:2 * n - 1]
    lags = np.flatnonzero(approx >= approx.max() - AC_FFT_SLACK * float(np.dot(a, a)))
    r = np.ascontiguousarray(a[::-1])  # a[k - i] = r[n - 1 - k + i]; dot is slow on strides < 0
    best = -math.inf
    for k in lags.tolist():
        lo, hi = max(0, k - n + 1), min(k, n - 1)
        best = max(best, float(np.dot(a[lo:hi + 1], r[n - 1 - k + lo:n - k + hi])))
    return best


def ac_bound(a):
    """2n max(a*a) / (sum a)^2 for clamped heights `a`."""
    return 2 * len(a) * ac_conv_max(a) / float(np.sum(a)) ** 2
# --- shipped to the candidate: end ---


def claim(result, count, what):
    """The `count` parts of a returned tuple/list."""
    if type(result) not in (list, tuple) or len(result) != count:
        raise Invalid(f"{what} must return a tuple of {count} values")
    return tuple(result)


def packing_from_result(result, n):
    """run_packing() -> (centers, radii, sum_radii) as a verified [[x, y, r]] list."""
    centers, radii, claimed = claim(result, 3, "run_packing()")
    if type(centers) not in (list, tuple) or len(centers) != n:
        raise Invalid(f"centers must have shape ({n}, 2)")
    xy = [reals(c, "a center", length=2).tolist() for c in centers]
    r = reals(radii, "radii", length=n).tolist()
    circles = [[cx, cy, cr] for (cx, cy), cr in zip(xy, r)]
    total = packing_sum(circles, n)
    if abs(real(claimed, "sum_radii") - total) > PACKING_CLAIM_ATOL:
        raise Invalid(f"claimed sum_radii {claimed} but the radii sum to {total}")
    return circles


def erdos_from_result(result, max_points):
    """run() -> (h_values, c5_bound, n_points) as the verified h list. It is kept as returned
    (not rescaled) so that re-verifying a state repeats exactly the same computation."""
    h_values, claimed, n_points = claim(result, 3, "run()")
    h = reals(h_values, "h_values", max_len=max_points).tolist()
    if real(n_points, "n_points") != len(h):
        raise Invalid(f"n_points is {n_points} but h has {len(h)} values")
    c5 = erdos_bound(erdos_normalise(h, max_points))
    if abs(real(claimed, "c5_bound") - c5) > ERDOS_CLAIM_ATOL:
        raise Invalid(f"claimed C5 {claimed} but the bound is {c5}")
    return h


# ============================================================================================
# Running a program in the sandbox: its entry function's return value, as plain data
# ============================================================================================
ALLOWED_PACKAGES = ("numpy", "scipy")
OUTPUT_CHARS = 500  # of a program's printed output kept in its state, as the official prompts
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ProgramFailed(RuntimeError):
    """The program did not load, raised, crashed, timed out or returned something unreadable."""


@dataclasses.dataclass(frozen=True)
class RunLimits:
    timeout_s: float = 30.0  # wall clock: interpreter start, imports, the program and its call
    memory_mb: int = 1024  # address space of the candidate (numpy + scipy need a few hundred MB)


@functools.lru_cache(maxsize=None)
def package_roots(names: tuple[str, ...] = ALLOWED_PACKAGES) -> dict[str, str]:
    """Directory of each installed package in `names` (without importing it)."""
    roots = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = list(spec.submodule_search_locations)[0]
    return roots


def _readable_dirs(roots: dict[str, str]) -> list[str]:
    """The packages and the shared libraries their wheels vendor next to them (numpy.libs)."""
    dirs = list(roots.values())
    for root in roots.values():
        libs = Path(root).parent / f"{Path(root).name}.libs"
        if libs.is_dir():
            dirs.append(str(libs))
    return dirs


def _import_prelude(roots: dict[str, str]) -> str:
    """Candidate-side source: a one-thread BLAS and a finder that imports exactly `roots`."""
    return f'''import math
import os as _os
import sys as _sys
import importlib.util as _ilu
for _v in {THREAD_VARS!r}:
    _os.environ[_v] = "1"


class _JaxtttPackages:
    roots = {roots!r}

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        root = cls.roots.get(name)
        if root is None:
            return None
        return _ilu.spec_from_file_location(name, _os.path.join(root, "__init__.py"),
                                            submodule_search_locations=[root])


_sys.meta_path.insert(0, _JaxtttPackages)
import numpy as np
'''


def _call_postlude(entry: str) -> str:
    """Candidate-side source: `_jaxttt_call(kwargs)` runs the entry, numpy values as lists."""
    return f'''

def _jaxttt_plain(x, depth=0):
    if depth > 8:
        raise TypeError("the result is nested too deeply")
    if hasattr(x, "tolist") and not isinstance(x, (list, tuple, str, bytes)):
        return x.tolist()  # numpy arrays and scalars: built-in values all the way down
    if isinstance(x, (list, tuple)):
        return [_jaxttt_plain(v, depth + 1) for v in x]
    return x


def _jaxttt_call(kwargs):
    fn = globals().get({entry!r})
    if not callable(fn):
        raise NameError("the program does not define {entry}()")
    try:
        return _jaxttt_plain(fn(**kwargs))
    finally:
        _sys.stdout.flush()
'''


def _read_frame(fd: int, deadline: float):
    """One wire frame from `fd` before `deadline`; ProgramFailed on timeout, EOF or garbage."""
    def read_exact(n: int) -> bytes:
        chunks, got = [], 0
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while got < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
                raise ProgramFailed("timed out")
            b = os.read(fd, min(n - got, 1 << 20))
            if not b:
                raise ProgramFailed("the program's process exited")
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    size = int.from_bytes(read_exact(4), "big")
    if size > wire.MAX_FRAME:
        raise ProgramFailed("the result is too large")
    try:
        return wire.decode(read_exact(size))
    except wire.WireError as e:
        raise ProgramFailed(f"unreadable result ({e})") from None


def _tail(f, chars: int) -> str:
    """The last `chars` characters of what the program printed (shown in the next prompt)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * chars))
    return f.read().decode("utf-8", errors="replace")[-chars:]


def run_program(code: str, entry_kwargs: dict, limits: RunLimits = RunLimits(), *,
                unsafe_local_exec: bool = False) -> tuple[Any, str]:
    """Run `code` (which ends by defining `_jaxttt_call`, see `_call_postlude`) in a confined
    sandbox process, call `_jaxttt_call(entry_kwargs)` there and return (its value as plain
    data, the tail of what it printed). Raises ProgramFailed for anything the program did
    wrong, SandboxUnavailable when it cannot be confined here (unless `unsafe_local_exec`)."""
    confined = sandbox.check_confinement(unsafe_local_exec)
    box = sandbox.Limits(timeout_s=limits.timeout_s, memory_mb=limits.memory_mb)
    deadline = time.monotonic() + limits.timeout_s
    (req_r, req_w), (rep_r, rep_w) = os.pipe(), os.pipe()
    to_close = [req_r, req_w, rep_r, rep_w]
    with sandbox._Workdir(confined) as workdir, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        proc = None
        try:
            cfg = sandbox._candidate_cfg(code, "serve", box, confined, workdir,
                                         extra_read=_readable_dirs(package_roots()))
            proc = sandbox._spawn("candidate", cfg, (req_r, rep_w), out, err, workdir or "/tmp")
            for fd in (req_r, rep_w):
                os.close(fd)
                to_close.remove(fd)
            hello = _read_frame(rep_r, deadline)
            if type(hello) is not dict or type(hello.get("names")) is not dict:
                why = hello.get("load_error") if type(hello) is dict else None
                raise ProgramFailed(f"the program did not load: {str(why)[:300]}")
            wire.write_frame(req_w, {"f": "_jaxttt_call", "a": (entry_kwargs,), "k": {}})
            reply = _read_frame(rep_r, deadline)
        except OSError as e:
            raise ProgramFailed(f"the program's process went away ({e.strerror})") from None
        finally:
            if proc is not None:
                sandbox._kill(proc)
            for fd in to_close:
                os.close(fd)
        printed = _tail(out, OUTPUT_CHARS)
    if type(reply) is dict and set(reply) == {"r"}:
        return reply["r"], printed
    x = reply.get("x") if type(reply) is dict else None
    if type(x) is list and len(x) == 2 and all(type(s) is str for s in x):
        raise ProgramFailed(f"{x[0]}: {x[1][:300]}")
    raise ProgramFailed("malformed reply")


@functools.lru_cache(maxsize=None)
def prelude_problem(memory_mb: int, unsafe_local_exec: bool) -> str | None:
    """Why the programs' prelude (numpy) does not load in the sandbox here, None when it does.
    That is the host's fault, not a program's: without this check it scored every program 0."""
    code = "\n".join([_import_prelude(package_roots()), "def run():\n    return 1\n", _call_postlude("run")])
    try:
        run_program(code, {}, RunLimits(timeout_s=60.0, memory_mb=memory_mb),
                    unsafe_local_exec=unsafe_local_exec)
    except ProgramFailed as e:
        return str(e)
    return None


# ============================================================================================
# Envs
# ============================================================================================
def encode_state(code: str, construction: Any, output: str = "") -> str:
    d = {"code": code, "construction": construction, **({"output": output} if output else {})}
    return json.dumps(d, separators=(",", ":"))


def _state_dict(state: str) -> dict:
    try:
        d = json.loads(state)
    except (ValueError, RecursionError):
        raise Invalid("the state is not JSON") from None
    keys = set(d) if type(d) is dict else set()
    if (not {"code", "construction"} <= keys <= {"code", "construction", "output"}
            or type(d["code"]) is not str or type(d.get("output", "")) is not str):
        raise Invalid("the state must be {code, construction[, output]}")
    return d


def decode_state(state: str) -> tuple[str, Any]:
    """(code, construction) of a state; Invalid if it is not one of ours."""
    d = _state_dict(state)
    return d["code"], d["construction"]


def state_output(state: str) -> str:
    """The tail of what the state's program printed ("" if none)."""
    try:
        return _state_dict(state).get("output", "") if state else ""
    except Invalid:
        return ""


def truncate_lines(code: str, max_lines: int) -> str:
    """Keep the first and last lines of a long program, as the official prompts do."""
    lines = code.rstrip("\n").split("\n")
    if len(lines) <= max_lines:
        return "\n".join(lines)
    half = max(1, max_lines // 2)
    return "\n".join(lines[:half] + ["# ... (middle truncated) ..."] + lines[-half:])


@functools.lru_cache(maxsize=1)
def _verifier_source() -> str:
    """The shipped block of this file (see the marker comments), for the candidate side."""
    src = Path(__file__).read_text()
    begin, end = "# --- shipped to the candidate: begin ---", "# --- shipped to the candidate: end ---"
    return src[src.index(begin) + len(begin):src.index(end)]


class ProgramEnv(DiscoveryEnv):
    """A problem whose action is a program returning a construction (see the module docstring).

    Subclasses set `entry` (the function the program defines), `start_global` (the name that
    holds the start construction, or None) and `helpers` (candidate-side source built on the
    shipped verifiers), and implement `construction_from_result`, `objective` and `describe`
    (and `reward_of`, `entry_kwargs`, `initial_state` where the default does not fit).
    """

    entry = "run"
    start_global: str | None = None
    helpers = ""
    higher_is_better = True
    objective_name = "value"
    value_format = ".6f"  # how prompts print the objective
    references: tuple[tuple[str, float], ...] = ()

    def __init__(self, *, timeout_s: float, memory_mb: int, max_code_lines: int,
                 unsafe_local_exec: bool, **options: Any):
        super().__init__(timeout_s=timeout_s, memory_mb=memory_mb, max_code_lines=max_code_lines,
                         unsafe_local_exec=unsafe_local_exec, **options)
        name = type(self).__name__
        if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s <= 3600):
            raise EnvError(f"{name}: timeout_s must be in (0, 3600], got {timeout_s!r}")
        if not (isinstance(memory_mb, int) and 64 <= memory_mb <= 65536):
            raise EnvError(f"{name}: memory_mb must be an integer in [64, 65536], got {memory_mb!r}")
        if not (isinstance(max_code_lines, int) and max_code_lines >= 2):
            raise EnvError(f"{name}: max_code_lines must be an integer >= 2, got {max_code_lines!r}")
        try:
            sandbox.check_confinement(bool(unsafe_local_exec))
        except sandbox.SandboxUnavailable as e:
            raise EnvError(f"{name}: {e}") from None
        why = prelude_problem(memory_mb, bool(unsafe_local_exec))
        if why is not None:
            raise EnvError(f"{name}: a program that only imports numpy fails in the sandbox here, so every "
                           f"program would score 0 ({why})")
        self.limits = RunLimits(timeout_s=float(timeout_s), memory_mb=memory_mb)
        self.max_code_lines, self.unsafe_local_exec = max_code_lines, bool(unsafe_local_exec)

    # ---- per problem ---------------------------------------------------------------------------
    @abc.abstractmethod
    def construction_from_result(self, result: Any) -> Any:
        """The verified construction from the entry function's plain-data result."""

    @abc.abstractmethod
    def objective(self, construction: Any) -> float:
        """The problem's quantity (sum of radii, a bound) of a construction; Invalid if invalid."""

    def reward_of(self, objective: float) -> float:
        return objective

    def entry_kwargs(self) -> dict:
        return {}

    @abc.abstractmethod
    def describe(self) -> str:
        """The problem statement and rules (the start of every prompt)."""

    # ---- the DiscoveryEnv interface ------------------------------------------------------------
    def problem_description(self) -> str:
        return self.describe()

    def reward(self, state: str) -> float:
        if not state:
            return 0.0
        try:
            _, construction = decode_state(state)
            return float(self.reward_of(self.objective(construction)))
        except Invalid:
            return 0.0

    def transition(self, action: str) -> str:
        """An action sampled from the initial prompt (best-of-N, hot-swap evaluation)."""
        return self.transition_from(self.initial_state(), action)

    def transition_from(self, start_state: str, action: str) -> str:
        code = extract_code(action)
        if not code.strip():
            raise InvalidAction("no code in the action")
        try:
            start = decode_state(start_state)[1] if start_state else None
            result, printed = run_program(self.program(code, start), self.entry_kwargs(),
                                          self.limits, unsafe_local_exec=self.unsafe_local_exec)
            construction = self.construction_from_result(result)
        except (ProgramFailed, Invalid) as e:
            raise InvalidAction(str(e)[:300]) from None
        return encode_state(code, construction, printed.strip())

    def program(self, code: str, start: Any) -> str:
        """Prelude (imports, checkers, the start construction) + `code` + the call wrapper."""
        parts = [_import_prelude(package_roots()), _verifier_source(), self.helpers]
        if self.start_global is not None and start is not None:
            parts.append(f"{self.start_global} = np.array({json.dumps(start)}, dtype=float)\n")
        parts += ["\n# ---- the program ----\n", code, _call_postlude(self.entry)]
        return "\n".join(parts)

    def value_lines(self, state: str, archive: Archive | None) -> list[str]:
        """The current value, the parent's value before it, and the references."""
        better = "higher" if self.higher_is_better else "lower"
        lines = []
        try:
            value = self.objective(decode_state(state)[1]) if state else None
        except Invalid:
            value = None
        node = archive.lookup(state) if archive is not None and state else None
        parent = archive.get(node.parent) if node is not None and node.parent is not None else None
        parent_value = None
        if parent is not None and parent.state:
            try:
                parent_value = self.objective(decode_state(parent.state)[1])
            except Invalid:
                pass
        if value is not None and parent_value is not None:
            lines.append(f"The {self.objective_name} before and after the code below ({better} is "
                         f"better): {parent_value:{self.value_format}} -> {value:{self.value_format}}")
        elif value is not None:
            lines.append(f"Current {self.objective_name} ({better} is better): "
                         f"{value:{self.value_format}}")
        refs = ", ".join(f"{who} {v}" for who, v in self.references)
        if refs:
            lines.append(f"For reference: {refs}.")
        return lines

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        try:
            code = decode_state(state)[0] if state else ""
        except Invalid:
            code = ""
        parts = [self.describe(), *self.value_lines(state, archive)]
        if code.strip():
            parts += ["Here is the last code we ran:",
                      f"```python\n{truncate_lines(code, self.max_code_lines)}\n```"]
            printed = state_output(state)
            if printed:
                parts.append(f"--- Its printed output (the end) ---\n{printed}\n--- End of output ---")
            parts.append("Improve on it; a different idea is welcome. "
                         "Answer with the whole new program.")
        else:
            parts.append("Write the program.")
        parts.append("```python\n")
        return "\n".join(parts)


# ---- circle packing ----------------------------------------------------------------------------
_PACKING_HELPERS = '''
def validate_packing(centers, radii):
    """True if the circles (centers (n, 2), radii (n,)) are a valid packing."""
    try:
        c, r = np.asarray(centers, dtype=float).tolist(), np.asarray(radii, dtype=float).tolist()
        packing_sum([[x, y, rr] for (x, y), rr in zip(c, r)], len(r))
        return True
    except (Invalid, ValueError, TypeError):
        return False
'''


class CirclePackingEnv(ProgramEnv):
    """Pack `n` circles in the unit square; reward = sum of radii of a valid packing, else 0."""

    version = "circle_packing-1"
    entry = "run_packing"
    helpers = _PACKING_HELPERS
    objective_name = "sum of radii"

    def __init__(self, *, n: int = 26, timeout_s: float = 8.0, memory_mb: int = 1024,
                 max_code_lines: int = 80, unsafe_local_exec: bool = False):
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1000):
            raise EnvError(f"circle_packing: n must be an integer in [1, 1000], got {n!r}")
        super().__init__(n=n, timeout_s=timeout_s, memory_mb=memory_mb,
                         max_code_lines=max_code_lines, unsafe_local_exec=unsafe_local_exec)
        self.n = n
        self.references = (("AlphaEvolve", 2.635), ("TTT-Discover", 2.635977)) if n == 26 else ()

    def construction_from_result(self, result: Any) -> list:
        return packing_from_result(result, self.n)

    def objective(self, construction: Any) -> float:
        return packing_sum(construction, self.n)

    def describe(self) -> str:
        n = self.n
        return (f"Pack {n} circles in the unit square [0,1]x[0,1] so that the sum of their radii "
                "is as large as possible.\n"
                f"Write a Python program that defines run_packing() returning (centers, radii, "
                f"sum_radii): centers of shape ({n}, 2), radii of shape ({n},) and their sum.\n"
                "Valid: every radius >= 0, every circle inside the square, no two circles "
                "overlapping (tolerance 1e-12); validate_packing(centers, radii) is predefined "
                "and checks this. An invalid packing scores 0.\n"
                "You may use numpy (np), scipy and math; no files or network; helpers at top "
                "level; the end of what it prints is shown back to you next time.")


# ---- Erdős minimum overlap ---------------------------------------------------------------------
_ERDOS_HELPERS = '''
def evaluate_erdos_solution(h_values, c5_bound, n_points):
    """The C5 bound of h (raises ValueError if h or the claimed c5_bound is invalid)."""
    h = np.asarray(h_values, dtype=float).tolist()
    try:
        if int(n_points) != len(h):
            raise Invalid("n_points must equal the number of h values")
        c5 = erdos_bound(erdos_normalise(h, len(h)))
    except Invalid as e:
        raise ValueError(str(e)) from None
    if abs(float(c5_bound) - c5) > ERDOS_CLAIM_ATOL:
        raise ValueError(f"C5 mismatch: claimed {c5_bound}, computed {c5}")
    return c5
'''


class _MinimisedBound(ProgramEnv):
    """A problem whose program searches for `budget_s` seconds for an upper bound to minimise:
    reward = 1 / bound (the official entropic-run choice), called as entry(seed=42, budget_s)."""

    budget_s: float

    def reward_of(self, objective: float) -> float:
        return 1.0 / objective

    def entry_kwargs(self) -> dict:
        return {"seed": 42, "budget_s": self.budget_s}


class ErdosMinOverlapEnv(_MinimisedBound):
    """Upper bound on Erdős' minimum overlap constant; reward = 1 / C5 of a valid h, else 0."""

    version = "erdos_min_overlap-1"
    entry = "run"
    start_global = "initial_h_values"
    helpers = _ERDOS_HELPERS
    higher_is_better = False
    objective_name = "C5 bound"
    references = (("best human", 0.380927), ("AlphaEvolve", 0.380924), ("TTT-Discover", 0.380876))

    def __init__(self, *, budget_s: float = 4.0, timeout_s: float | None = None,
                 memory_mb: int = 1024, max_points: int = 20_000, seed: int = 0,
                 max_code_lines: int = 80, unsafe_local_exec: bool = False):
        if not (isinstance(budget_s, (int, float)) and budget_s > 0):
            raise EnvError(f"erdos_min_overlap: budget_s must be > 0, got {budget_s!r}")
        if not (isinstance(max_points, int) and 1 <= max_points <= 200_000):
            raise EnvError(f"erdos_min_overlap: max_points must be in [1, 200000], got {max_points!r}")
        timeout_s = float(budget_s) + 4.0 if timeout_s is None else timeout_s
        super().__init__(budget_s=budget_s, timeout_s=timeout_s, memory_mb=memory_mb,
                         max_points=max_points, seed=seed, max_code_lines=max_code_lines,
                         unsafe_local_exec=unsafe_local_exec)
        self.budget_s, self.max_points, self.seed = float(budget_s), max_points, int(seed)

    def initial_state(self) -> str:
        """The official random start: 0.5 + a zero-mean perturbation, 40..99 samples, no code."""
        rng = np.random.default_rng(self.seed)
        n = int(rng.integers(40, 100))
        noise = rng.uniform(-0.4, 0.4, n)
        return encode_state("", (0.5 + noise - noise.mean()).tolist())

    def construction_from_result(self, result: Any) -> list:
        return erdos_from_result(result, self.max_points)

    def objective(self, construction: Any) -> float:
        return erdos_bound(erdos_normalise(construction, self.max_points))

    def describe(self) -> str:
        b = f"{self.budget_s:g}"
        return ("Find a step function h: [0, 2] -> [0, 1] with integral 1 that minimises "
                "C5 = max_k integral h(x) (1 - h(x + k)) dx, an upper bound for Erdős' minimum "
                "overlap constant.\n"
                "Represent h by n samples over [0, 2] (dx = 2/n): 0 <= h[i] <= 1 and "
                "sum(h) * dx = 1 (h is rescaled to this); then C5 = "
                "max(np.correlate(h, 1 - h, mode='full') * dx).\n"
                f"Write a Python program that defines run(seed=42, budget_s={b}, **kwargs) "
                "returning (h_values, c5_bound, n_points) within budget_s seconds; at most "
                f"{self.max_points} samples (under 1000 is faster).\n"
                "Predefined: initial_h_values (the current construction, a numpy array) and "
                "evaluate_erdos_solution(h_values, c5_bound, n_points), which returns the "
                "bound or raises ValueError.\n"
                "You may use numpy (np), scipy and math; no files or network; helpers at top "
                "level; the end of what it prints is shown back to you next time. Lower C5 is better.")


# ---- first autocorrelation inequality (AC1) -----------------------------------------------------
_AC_HELPERS = '''
def evaluate_sequence(sequence):
    """The AC1 upper bound 2n max(a*a) / sum(a)^2 of the heights, or inf if invalid."""
    try:
        return ac_bound(ac_heights(np.asarray(sequence, dtype=float).tolist(), 10 ** 9))
    except (Invalid, ValueError, TypeError):
        return float("inf")
'''

_AC_INITIAL_PROGRAM = '''import time

import numpy as np


def propose_candidate(seed=42, budget_s=4, **kwargs):
    """Local search from the current heights: raise or lower one height at a time and keep
    the change when the bound drops."""
    rng = np.random.default_rng(seed)
    best = np.array(height_sequence_1, dtype=float)
    best_value = evaluate_sequence(best.tolist())
    deadline = time.time() + 0.7 * budget_s
    while time.time() < deadline:
        trial = best.copy()
        i = rng.integers(len(trial))
        trial[i] = max(0.0, trial[i] * (1.0 + rng.normal(0.0, 0.3)))
        value = evaluate_sequence(trial.tolist())
        if value < best_value:
            best, best_value = trial, value
    return best.tolist()
'''


class AutocorrelationEnv(_MinimisedBound):
    """AC1 upper bound from non-negative step heights; reward = 1 / bound, 0 if invalid."""

    version = "autocorrelation-1"
    entry = "propose_candidate"
    start_global = "height_sequence_1"
    helpers = _AC_HELPERS
    higher_is_better = False
    objective_name = "upper bound"
    value_format = ".10f"  # as the official prompts: improvements are in the 5th decimal
    references = (("best human", 1.50973), ("AlphaEvolve", 1.50314), ("TTT-Discover", 1.50287))

    def __init__(self, *, budget_s: float = 4.0, timeout_s: float | None = None,
                 memory_mb: int = 1024, max_len: int = 50_000, initial_length: int = 600,
                 max_code_lines: int = 80, unsafe_local_exec: bool = False):
        if not (isinstance(budget_s, (int, float)) and budget_s > 0):
            raise EnvError(f"autocorrelation: budget_s must be > 0, got {budget_s!r}")
        if not (isinstance(max_len, int) and 1 <= max_len <= 200_000):
            raise EnvError(f"autocorrelation: max_len must be in [1, 200000], got {max_len!r}")
        if not (isinstance(initial_length, int) and 1 <= initial_length <= max_len):
            raise EnvError("autocorrelation: initial_length must be in [1, max_len], "
                           f"got {initial_length!r}")
        timeout_s = float(budget_s) + 4.0 if timeout_s is None else timeout_s
        super().__init__(budget_s=budget_s, timeout_s=timeout_s, memory_mb=memory_mb,
                         max_len=max_len, initial_length=initial_length,
                         max_code_lines=max_code_lines, unsafe_local_exec=unsafe_local_exec)
        self.budget_s, self.max_len, self.initial_length = float(budget_s), max_len, initial_length

    def initial_state(self) -> str:
        """The official "random" start: constant heights (bound exactly 2) and a search program."""
        return encode_state(_AC_INITIAL_PROGRAM, [1.0] * self.initial_length)

    def construction_from_result(self, result: Any) -> list:
        return ac_heights(result, self.max_len).tolist()

    def objective(self, construction: Any) -> float:
        return ac_bound(ac_heights(construction, self.max_len))

    def describe(self) -> str:
        b = f"{self.budget_s:g}"
        return ("Find non-negative heights a_0..a_{n-1} of a step function that minimise the "
                "autocorrelation upper bound 2n * max(np.convolve(a, a)) / sum(a)**2 (heights "
                f"are clipped to [0, 1000]; the sum must be at least 0.01; n <= {self.max_len}).\n"
                f"Write a Python program that defines propose_candidate(seed=42, budget_s={b}, "
                "**kwargs) returning the list of heights within budget_s seconds.\n"
                "Predefined: height_sequence_1 (the current construction, a numpy array) and "
                "evaluate_sequence(sequence), which returns the bound (inf if invalid).\n"
                "You may use numpy (np), scipy and math; no files or network; helpers at top "
                "level; the end of what it prints is shown back to you next time. Lower is better.")


PROBLEMS: dict[str, type[DiscoveryEnv]] = {
    "circle_packing": CirclePackingEnv,
    "erdos_min_overlap": ErdosMinOverlapEnv,
    "autocorrelation": AutocorrelationEnv,
}
