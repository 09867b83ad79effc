"""The run layer: run directories, loading a run, JSONL logs, the cache root, user errors.

Every command goes through here, so each of these exists once:
- `fresh_run_dir` / `RunDirError`: a new run never overwrites anything.
- `save_run_config`: a portable `config.yaml` (a run's own directory is never written into
  it, so a copied run directory resumes as the copy and never touches the original).
- `load_run(spec) -> (model, tokenizer, meta)`: a model run (or one of its checkpoint steps),
  its tokenizer (explicit, else the one the run recorded), and what the run saved.
- `JsonlWriter` / `append_jsonl` / `read_jsonl`: the one JSON Lines writer and reader; a torn
  last line (crash or full disk mid-write) is dropped with a warning, never fatal.
- `cache_root()`: `$JAXTTT_CACHE`, else `$XDG_CACHE_HOME/jaxttt`, else `~/.cache/jaxttt`.
- `UserError` (from `jaxttt.errors`): what `jaxttt.cli.main` prints as one line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from jaxttt import config as C
from jaxttt.errors import UserError

__all__ = ["UserError", "RunDirError", "fresh_run_dir", "run_name", "save_run_config",
           "config_for_resume", "cache_root", "CACHE_ENV", "load_run", "tokenizer_path",
           "JsonlWriter", "append_jsonl", "read_jsonl", "repair_jsonl", "rewind_jsonl", "warn"]

CONFIG_YAML = "config.yaml"
MODEL_YAML = "model.yaml"
CACHE_ENV = "JAXTTT_CACHE"


class RunDirError(UserError, FileExistsError):
    """A run directory cannot be used: it would be overwritten, or does not match the config."""


def warn(msg: str) -> None:
    """One warning line on stderr (a fault that was handled; nothing was lost)."""
    print(f"jaxttt: warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------
def run_name(kind: str, stamp: float | None = None) -> str:
    """Default run directory `runs/<kind>-YYYYmmdd-HHMMSS` (local time of `stamp`)."""
    return f"runs/{kind}-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(stamp))


def fresh_run_dir(path: str | Path, *, keep: Iterable[str] = ()) -> Path:
    """Create `path` (absolute) for a new run; refuse one holding anything but `keep` names.

    Every loop that writes a new run directory goes through here, so none overwrites a run.
    """
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a directory")
    allowed = set(keep)
    stray = sorted(p.name for p in out.iterdir() if p.name not in allowed) if out.is_dir() else []
    if stray:
        raise RunDirError(f"{out}: output directory is not empty ({', '.join(stray[:5])}); "
                          "runs are never overwritten, choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_run_config(cfg, run_dir: str | Path, name: str = CONFIG_YAML) -> Path:
    """Write `cfg` as RUN/config.yaml without the run's own location in it.

    `run_dir` is written empty (the directory holding config.yaml is the run) and a `ckpt_dir`
    inside the run is written relative to it, so a copy of the directory is a self-contained
    run: resuming the copy reads and writes only the copy.
    """
    run = Path(run_dir).absolute()
    data = C.to_dict(cfg)
    if "run_dir" in data:
        data["run_dir"] = ""
    if data.get("ckpt_dir") and "://" not in data["ckpt_dir"]:  # inside: relative; else absolute
        ckpt = Path(data["ckpt_dir"]).absolute()
        data["ckpt_dir"] = str(ckpt.relative_to(run) if ckpt.is_relative_to(run) else ckpt)
    path = run / name
    C.write_yaml(data, path)
    return path


def run_dir_of_config(config_path: str | Path) -> Path | None:
    """The run directory that `config_path` belongs to (its RUN/config.yaml), else None."""
    p = Path(config_path)
    if p.name == CONFIG_YAML and (p.parent / MODEL_YAML).is_file():
        return p.parent.absolute()
    return None


def config_for_resume(cfg, config_path: str | Path | None):
    """`cfg` loaded from a run's own config.yaml resumes that run (the file's directory).

    An explicit `run_dir=` override wins; a relative `ckpt_dir` is relative to the run.
    """
    run = run_dir_of_config(config_path) if config_path else None
    if run is None or not hasattr(cfg, "run_dir"):
        return cfg
    changes: dict[str, Any] = {}
    if not cfg.run_dir:
        changes["run_dir"] = str(run)
    base = Path(changes.get("run_dir", cfg.run_dir)).absolute()
    ckpt = getattr(cfg, "ckpt_dir", "")
    if ckpt and "://" not in ckpt and not Path(ckpt).is_absolute():
        changes["ckpt_dir"] = str(base / ckpt)
    return dataclasses.replace(cfg, **changes) if changes else cfg


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """$JAXTTT_CACHE, else $XDG_CACHE_HOME/jaxttt, else ~/.cache/jaxttt (default corpus,
    tokenizer, compiled programs). A set-but-unusable variable is a user error."""
    raw = os.environ.get(CACHE_ENV)
    if raw is None:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        return (Path(xdg) if xdg else Path("~/.cache").expanduser()) / "jaxttt"
    if not raw.strip():
        raise UserError(f"environment variable {CACHE_ENV} is set but empty; expected a "
                        "directory (or unset it for ~/.cache/jaxttt)")
    path = Path(raw).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"environment variable {CACHE_ENV}={raw!r}: exists and is not a directory")
    return path


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(n: int = 1) -> bool:
    """Cap glibc's malloc arenas (as MALLOC_ARENA_MAX=n would; an explicit setting is kept).

    Each thread that allocates gets its own arena, and freed blocks go back to the arena that
    gave them. With XLA's worker threads and the background compile thread holding arenas, a
    step's gigabytes of temporaries kept coming back as fresh pages the kernel had to zero.
    One arena made the SmolLM2 demo's TTT-Discover stage 227 -> 185 s and the SDFT stage after
    it 110 -> 87 s (README, "Results of a `jaxttt demo` run"). Every `jaxttt` command sets it;
    returns whether the cap was set (glibc only)."""
    import ctypes

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_ARENA_MAX, n))


def enable_compile_cache() -> None:
    """Persist compiled XLA programs under cache_root()/xla: a rerun or a resumed run skips
    the compiles (every `jaxttt` command; the demo and depth study when called from Python)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_root() / "xla"))


# --------------------------------------------------------------------------------------------
# Loading a run
# --------------------------------------------------------------------------------------------
def tokenizer_path(meta: dict, run_dir: str | Path, explicit: str | Path | None = None) -> Path:
    """The explicit tokenizer, else the one the run recorded (relative = inside the run)."""
    if explicit:
        return Path(explicit).absolute()
    recorded = meta.get("tokenizer")
    if not recorded:
        raise UserError(f"{run_dir}: the run records no tokenizer; pass --tokenizer")
    path = Path(recorded)
    path = path if path.is_absolute() else Path(run_dir) / path
    if not path.is_file():
        raise UserError(f"{run_dir}: the run's tokenizer {path} does not exist; pass --tokenizer")
    return path


def resolve_named(spec: str | Path) -> str | Path:
    """A named pretrained model (e.g. smollm2-135m-instruct) becomes its run directory under the
    cache root, converted on first use; any other spec is returned unchanged."""
    from jaxttt.model import named

    if str(spec) in named.NAMED and not Path(spec).exists():
        from jaxttt.model.pretrained import ensure_named_run
        return ensure_named_run(str(spec))
    return spec


def load_run(spec: str | Path, *, mesh=None, step: int | None = None,
             tokenizer: str | Path | None = None, overrides: tuple[str, ...] = ()):
    """(model, tokenizer, meta) of a model run, its checkpoints/ folder, one step in it, or a
    named pretrained model (`resolve_named`).

    The newest good checkpoint unless `step` (or a step folder) is given; a corrupt newest
    step is reported and skipped. `meta` is what the run saved (step, tokenizer, ...) plus
    `run_dir`. `overrides` adjust the ModelConfig (e.g. `dtype=bfloat16`), never its shapes.
    """
    from jaxttt.data.tokenizer import load_tokenizer
    from jaxttt.train.checkpoint import find_run_dir, load_model

    spec = resolve_named(spec)
    run_dir, _ = find_run_dir(spec)
    model, meta = load_model(spec, mesh=mesh, step=step, overrides=tuple(overrides))
    tok = load_tokenizer(tokenizer_path(meta, run_dir, tokenizer))
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{spec}: tokenizer {tok.path} has {tok.vocab_size} pieces but the "
                        f"model's vocab_size is {model.cfg.vocab_size}")
    return model, tok, {**meta, "run_dir": str(run_dir)}


# --------------------------------------------------------------------------------------------
# JSON Lines
# --------------------------------------------------------------------------------------------
def _split_torn(text: str) -> tuple[list[str], str | None]:
    """(complete lines, torn tail or None): a last line without its newline that is not JSON."""
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    if tail.strip():
        try:
            json.loads(tail)
            lines.append(tail)  # a complete record that only lacks its newline
        except json.JSONDecodeError:
            return lines, tail
    return lines, None


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file; a torn last line is dropped with a warning, any other
    bad line is a UserError naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    lines, torn = _split_torn(path.read_text(encoding="utf-8"))
    if torn is not None:
        warn(f"{path}:{len(lines) + 1}: dropped a torn last line ({len(torn)} bytes, no newline)")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows  # any JSON value per line (readers of foreign logs check the shape)


def repair_jsonl(path: str | Path) -> bool:
    """Cut a torn last line off `path` in place (with a warning); True when one was cut."""
    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    lines, torn = _split_torn(text)
    if torn is None:
        if text and not text.endswith("\n"):  # complete last record lacking its newline
            with path.open("a", encoding="utf-8") as f:
                f.write("\n")
        return False
    warn(f"{path}:{len(lines) + 1}: dropped a torn last line ({len(torn)} bytes) before resuming")
    _atomic_write(path, "".join(line + "\n" for line in lines))
    return True


def rewind_jsonl(path: str | Path, last_step: int) -> None:
    """Drop rows after `last_step` (steps redone after resuming from an older checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    repair_jsonl(path)
    keep = [line for line, row in _parsed(path) if row.get("step", -1) <= last_step]
    _atomic_write(path, "".join(line + "\n" for line in keep))


def _parsed(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every non-blank line; a bad one is a UserError naming FILE:LINE."""
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        out.append((line, row))
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class JsonlWriter:
    """Append-only JSON Lines file, one flushed line per record (readable while a run goes).

    Opening an existing file repairs a torn last line; `resume_step` also drops rows of steps
    after it (they are redone).
    """

    def __init__(self, path: str | Path, *, resume_step: int | None = None, repair: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            rewind_jsonl(self.path, resume_step)
        elif repair:
            repair_jsonl(self.path)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, default=_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append `records` to `path` (one line each; a file this process is writing)."""
    with JsonlWriter(path, repair=False) as w:
        for r in records:
            w.write(r)


def _default(x: Any) -> Any:
    """numpy scalars and paths in records."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)
