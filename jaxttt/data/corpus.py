"""Documents from text, jsonl, directories of .py files, TFDS, or the embedded default corpus.

A *source* is a path or a string:
  file.txt                      one document per line (blank lines skipped)
  file.jsonl                    one JSON object per line; the document is field `text_field`
  some/dir/                     every .py file below it (sorted), one file = one document
  tfds:NAME[/CONFIG]:SPLIT[:DATA_DIR]   `tfds.data_source` (ArrayRecord, no TensorFlow needed)
  default:SPLIT[:MAX_BYTES]     the embedded corpus (this Python's standard library), train|val
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

DEFAULT_MAX_BYTES = 4_000_000  # ~1M tokens at vocab 2048: trains + packs in well under a minute
VAL_EVERY = 20  # every 20th default-corpus file is held out for validation
_MAX_FILE_BYTES = 256_000  # skip generated tables (pydoc_data/topics.py, ...)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib",
              "turtledemo", "encodings", "pydoc_data", "ensurepip", "__pycache__", "lib2to3"}


def iter_documents(source: Path | str, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one source (see the module docstring)."""
    s = str(source)
    if s.startswith("tfds:"):
        yield from _tfds_documents(s, text_field)
    elif s.startswith("default:"):
        split, _, max_bytes = s[len("default:"):].partition(":")
        yield from default_documents(split, int(max_bytes or DEFAULT_MAX_BYTES))
    else:
        yield from _path_documents(Path(source), text_field)


def _path_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.is_dir():
        for f in sorted(path.rglob("*.py")):
            yield f.read_text(encoding="utf-8", errors="replace")
    elif not path.exists():
        raise FileNotFoundError(f"corpus source not found: {path}")
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif path.suffix in (".txt", ".text", ""):
        yield from _text_documents(path)
    else:
        raise ValueError(f"{path}: unsupported corpus file type {path.suffix!r} (expected .txt, "
                         ".jsonl, a directory of .py files, tfds:... or default:...)")


def _text_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield _jsonl_text(line, text_field, path, n)


def _jsonl_text(line: str, text_field: str, path: Path, n: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from e
    if not isinstance(obj, dict) or text_field not in obj:
        raise ValueError(f"{path}:{n}: missing field {text_field!r}")
    if not isinstance(obj[text_field], str):
        raise ValueError(f"{path}:{n}: field {text_field!r} is {type(obj[text_field]).__name__}, "
                         "not a string")
    return obj[text_field]


# --------------------------------------------------------------------------------------------
# TFDS
# --------------------------------------------------------------------------------------------
def parse_tfds_spec(spec: str) -> tuple[str, str, str | None]:
    """'tfds:NAME[/CONFIG]:SPLIT[:DATA_DIR]' -> (name, split, data_dir).

    Colons inside brackets belong to the split (`train[:10%]`); the data dir may contain
    colons itself (`gs://bucket/dir`).
    """
    body = spec[len("tfds:"):]
    name, sep, rest = body.partition(":")
    depth, cut = 0, len(rest)
    for i, ch in enumerate(rest):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == ":" and depth == 0:
            cut = i
            break
    split, data_dir = rest[:cut], rest[cut + 1:] or None
    if not name or not sep or not split:
        raise ValueError(f"bad TFDS source {spec!r}: expected tfds:NAME[/CONFIG]:SPLIT[:DATA_DIR]")
    return name, split, data_dir


def _tfds_documents(spec: str, text_field: str) -> Iterator[str]:
    import tensorflow_datasets as tfds  # heavy import, only when asked for

    name, split, data_dir = parse_tfds_spec(spec)
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    for i in range(len(source)):
        record = source[i]
        if text_field not in record:
            raise ValueError(f"{spec}: record {i} has no field {text_field!r} "
                             f"(fields: {sorted(record)})")
        text = record[text_field]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


# --------------------------------------------------------------------------------------------
# Embedded default corpus: the standard library's own sources
# --------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Stdlib .py files (no tests, site-packages, idlelib, ...), at most `max_bytes` in all.

    Files are picked in a fixed pseudo-random order (sha1 of the relative path), so a small
    cap still spans many modules, and returned sorted: the same list on every run.
    """
    root = stdlib_root()
    candidates = [f for f in _walk_py(root) if 0 < f.stat().st_size <= _MAX_FILE_BYTES]
    picked, total = [], 0
    for f in sorted(candidates, key=lambda f: _digest(f.relative_to(root))):
        size = f.stat().st_size
        if total + size <= max_bytes:
            picked.append(f)
            total += size
    if not picked:
        raise FileNotFoundError(f"no standard-library .py sources under {root} "
                                f"(max_bytes={max_bytes})")
    return sorted(picked)


def _walk_py(root: Path) -> Iterator[Path]:
    """.py files under `root`, pruning test/vendor directories without descending into them."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def _digest(rel: Path) -> str:
    return hashlib.sha1(rel.as_posix().encode()).hexdigest()


def default_split_files(split: str, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Deterministic held-out split: every VAL_EVERY-th default file is `val`."""
    if split not in ("train", "val"):
        raise ValueError(f"default corpus split must be 'train' or 'val', got {split!r}")
    files = default_corpus_files(max_bytes)
    if len(files) < 2:
        raise ValueError(f"default corpus of max_bytes={max_bytes} has {len(files)} file: "
                         "too few for a train/val split")
    # every VAL_EVERY-th file; a cap too small for that still holds out its last file
    is_val = [i % VAL_EVERY == VAL_EVERY - 1 or (i == len(files) - 1 and len(files) < VAL_EVERY)
              for i in range(len(files))]
    return [f for f, v in zip(files, is_val) if v == (split == "val")]


def default_documents(split: str = "train", max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[str]:
    for f in default_split_files(split, max_bytes):
        yield f.read_text(encoding="utf-8", errors="replace")
