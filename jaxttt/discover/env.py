"""The discovery-problem interface (handoff: state s, action a, s' = T(a), R(s')) and loading.

A `DiscoveryEnv` turns an archive state into a prompt (`context_from_archive`), a model
continuation of that prompt (the action) into a new state (`transition`), and a state into a
verifiable reward (`reward`). `safe_reward` is how the loop calls an env: whatever the env
does (raise, hang, return NaN), the loop gets a finite reward and an error string.
"""
from __future__ import annotations

import abc
import datetime
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxttt.discover.archive import Archive


class EnvError(ValueError):
    """An environment spec or its options are wrong; the message says which and why."""


INVALID = "invalid action"  # prefix of safe_reward's error for an invalid action (not an env fault)


class InvalidAction(ValueError):
    """Raised by `transition` for an action that yields no state (no code in it, a program that
    failed or returned an invalid construction): reward 0, logged as "invalid action: <why>"."""


class DiscoveryEnv(abc.ABC):
    """One discovery problem. States and actions are strings; rewards are floats, 0 if invalid.

    Subclasses take their options as keyword arguments (so an unknown option is an error)
    and set `version`, which is logged with every reward (G5: env_version).
    """

    version: str = "0"

    def __init__(self, **options: Any):
        self.options = dict(options)

    @abc.abstractmethod
    def problem_description(self) -> str:
        """The problem statement (also what `problem_id` hashes)."""

    @property
    def problem_id(self) -> str:
        return hashlib.sha256(self.problem_description().encode()).hexdigest()[:12]

    def initial_state(self) -> str:
        """The seed state s0 of the archive."""
        return ""

    def context_from_archive(self, state: str, archive: Archive | None) -> str:
        """The prompt whose model continuation is the action that improves `state`."""
        node = archive.lookup(state) if archive is not None else None
        score = f" (reward {node.reward:.4f})" if node is not None else ""
        return (f"{self.problem_description()}\n"
                f"Current solution{score}:\n{state or '<empty>'}\n"
                f"Improved solution:\n")

    @abc.abstractmethod
    def transition(self, action: str) -> str:
        """Parse a model output into a new state; "" (or an exception) means invalid."""

    def transition_from(self, start_state: str, action: str) -> str:
        """The new state from an action sampled at `start_state`. Envs whose actions build on
        the start state's data (a program refining the current construction) override this."""
        return self.transition(action)

    @abc.abstractmethod
    def reward(self, state: str) -> float:
        """Deterministic, verifiable, preferably continuous; 0.0 for an invalid state."""


# --------------------------------------------------------------------------------------------
# Calling an env safely
# --------------------------------------------------------------------------------------------
def _as_reward(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"reward must be a real number, got {type(value).__name__}")
    r = float(value)
    if not math.isfinite(r):
        raise ValueError(f"reward must be finite, got {r}")
    return r


def _transition_and_reward(env: DiscoveryEnv, action: str,
                           start_state: str | None) -> tuple[str, float]:
    state = env.transition(action) if start_state is None else env.transition_from(start_state, action)
    if not isinstance(state, str):
        raise TypeError(f"transition must return str, got {type(state).__name__}")
    if not state:
        return "", 0.0
    return state, _as_reward(env.reward(state))


def safe_reward(env: DiscoveryEnv, action: str, timeout_s: float = 10.0,
                start_state: str | None = None) -> tuple[str, float, str | None]:
    """(state, reward, error): transition + reward with every failure mapped to reward 0.
    With `start_state` (the state the action was sampled from) the env's `transition_from`.

    Runs in a daemon worker thread joined with `timeout_s`. Python cannot kill a thread, so a
    hung env keeps its thread (and a CPU core, if it spins) until it returns or the process
    exits; envs that execute code must bound that work themselves (the code envs do: candidates
    run in `jaxttt.eval.sandbox`'s confined processes under a wall-clock limit). An empty state
    or an `InvalidAction` is invalid: reward 0 and an error starting with INVALID.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["out"] = _transition_and_reward(env, action, start_state)
        except InvalidAction as e:
            box["invalid"] = str(e)
        except BaseException as e:  # noqa: BLE001 - any env failure is reward 0
            box["err"] = f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=work, name="jaxttt-env-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return "", 0.0, f"timeout: env did not answer within {timeout_s:g}s"
    if "err" in box:
        return "", 0.0, box["err"]
    if "invalid" in box:
        return "", 0.0, f"{INVALID}: {box['invalid']}"
    state, reward = box["out"]
    return state, reward, (None if state else f"{INVALID}: empty state")


def reward_record(env: DiscoveryEnv, prompt: str, action: str, state: str, reward: float,
                  error: str | None = None) -> dict[str, Any]:
    """One line of the discovery log (handoff G5), ready for json.dumps."""
    return {"problem_id": env.problem_id, "prompt": prompt, "action": action, "state": state,
            "reward": float(reward), "error": error,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "env_version": f"{type(env).__name__}/{env.version}"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
# Built-in envs are named here, not imported: the modules that define them import this one,
# so they are reached by name at load time like any user env (no import cycle).
BUILTIN_ENVS = {
    "toy": "jaxttt.discover.envs:ToyStringEnv",
    "numeric": "jaxttt.discover.envs:NumericTargetEnv",
    "code": "jaxttt.discover.envs:CodeTestsEnv",
    "gsm8k": "jaxttt.discover.envs:GSM8KEnv",
    "humaneval": "jaxttt.discover.envs:HumanEvalEnv",  # humaneval:HumanEval/12
    "mbpp": "jaxttt.discover.envs:MbppEnv",  # mbpp:Mbpp/2 with option path
}
BUILTIN_REGISTRIES = ("jaxttt.discover.problems:PROBLEMS",)  # name -> class tables


def _attribute(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def builtin_envs() -> dict[str, type[DiscoveryEnv]]:
    envs = {name: _attribute(spec) for name, spec in BUILTIN_ENVS.items()}
    for table in BUILTIN_REGISTRIES:
        envs.update(_attribute(table))
    return envs


def split_spec(spec: str) -> tuple[str, dict]:
    """`name:key=value,key=value` for a built-in env -> (name, options), values parsed as YAML
    (`circle_packing:n=26`, `numeric:target=[1, 2],alpha=0.5`); a class may parse its own tail
    with a `spec_options(tail)` classmethod. Other specs (module:Class, file.py:Class) come back
    unchanged with {}."""
    name, sep, tail = spec.partition(":")
    builtins = builtin_envs()
    if not sep or name not in builtins:
        return spec, {}
    parse = getattr(builtins[name], "spec_options", None)
    if parse is not None:
        return name, dict(parse(tail))
    import yaml

    options = {}
    for item in filter(None, (p.strip() for p in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", tail))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise EnvError(f"env spec {spec!r}: expected {name}:key=value[,key=value], got {item!r}")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise EnvError(f"env spec {spec!r}: cannot parse the value of {key.strip()!r} ({e})") from e
    return name, options


def _module_from_file(path_str: str):
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise EnvError(f"env file {path_str!r} does not exist")
    name = "jaxttt_user_env_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise EnvError(f"cannot import env file {path_str!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise EnvError(f"importing env file {path_str!r} failed: {type(e).__name__}: {e}") from e
    return module


def _module_from_name(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise EnvError(f"env module {module_name!r} not found ({e})") from e


def _resolve_class(spec: str) -> type:
    builtins = builtin_envs()
    if spec in builtins:
        return builtins[spec]
    module_part, sep, class_name = spec.rpartition(":")
    if not sep or not module_part or not class_name:
        raise EnvError(f"unknown env {spec!r}: use a built-in name ({', '.join(builtins)}), "
                       "package.module:ClassName or path/to/file.py:ClassName")
    is_file = module_part.endswith(".py") or "/" in module_part
    module = _module_from_file(module_part) if is_file else _module_from_name(module_part)
    cls = getattr(module, class_name, None)
    if cls is None:
        found = [n for n, v in vars(module).items()
                 if inspect.isclass(v) and issubclass(v, DiscoveryEnv) and v is not DiscoveryEnv]
        raise EnvError(f"{module_part!r} has no class {class_name!r}"
                       f" (DiscoveryEnv subclasses there: {found or 'none'})")
    return cls


def load_env(spec: str, options: dict | None = None) -> DiscoveryEnv:
    """Build an env from a built-in name (toy, numeric, code, gsm8k, circle_packing, ...),
    optionally with options in the name (`circle_packing:n=26`, `humaneval:HumanEval/12`),
    `package.module:Class` or
    `path/to/file.py:Class`, passing `options` as keyword arguments."""
    spec, spec_options = split_spec(spec)
    clash = sorted(k for k in spec_options if k in (options or {}) and options[k] != spec_options[k])
    if clash:
        raise EnvError(f"env {spec!r}: option {clash[0]!r} given twice with different values")
    options = {**spec_options, **(options or {})}
    cls = _resolve_class(spec)
    if not (inspect.isclass(cls) and issubclass(cls, DiscoveryEnv)):
        raise EnvError(f"{spec!r} is not a DiscoveryEnv subclass (got {cls!r})")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise EnvError(f"{spec!r} does not implement {missing}")
    try:
        return cls(**dict(options or {}))
    except TypeError as e:
        raise EnvError(f"env {spec!r} rejected options {sorted((options or {}))}: {e}") from e
