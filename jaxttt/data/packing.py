"""Pack documents into one flat token stream (.bin) with EOS after every document (handoff B3).

`X.bin` holds raw little-endian uint16 ids (uint32 when the vocab exceeds 65535); `X.bin.json`
records the tokenizer (path, sha256), vocab_size, dtype, n_tokens and n_docs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from jaxttt.data import corpus
from jaxttt.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

DOCS_PER_CHUNK = 256  # documents encoded and written per step: memory stays flat
_CHECK_CHUNK = 1 << 24  # tokens per block when scanning a .bin for its max id


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 up to vocab 65535, else uint32 (handoff Phase 2)."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def pack(tokenizer_path: Path | str, sources: Sequence[Path | str] | Path | str,
         output: Path | str, *, text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize every document of `sources` into `output` (+ `.json` meta); returns the meta."""
    tok = load_tokenizer(tokenizer_path)  # SentencePiece or a model's tokenizer.json
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    docs = (d for s in sources for d in corpus.iter_documents(s, text_field=text_field))
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    try:
        n_tokens, n_docs = _write_stream(tok, docs, tmp, dtype, progress, output.name)
        if n_tokens == 0:
            raise ValueError(f"packing {[str(s) for s in sources]} gave no tokens: "
                             "are the inputs empty or all blank lines?")
        meta = dict(tokenizer=str(Path(tokenizer_path).resolve()), tokenizer_sha256=tok.sha256,
                    vocab_size=tok.vocab_size, dtype=dtype.name, n_tokens=n_tokens,
                    n_docs=n_docs, eos_id=tok.eos_id, sources=[str(s) for s in sources],
                    text_field=text_field)
        meta_path(output).unlink(missing_ok=True)  # never pair a new .bin with an old .json
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(meta_path(output), meta)
    return meta


def _write_stream(tok: Tokenizer, docs: Iterable[str], path: Path, dtype: np.dtype,
                  progress: bool, label: str) -> tuple[int, int]:
    """Encode `docs` chunk by chunk, each followed by EOS; returns (n_tokens, n_docs)."""
    n_tokens = n_docs = 0
    bar = tqdm(desc=f"pack {label}", unit=" doc", disable=not progress, file=sys.stderr)
    with path.open("wb") as f, bar:
        for chunk in _chunks(docs, DOCS_PER_CHUNK):
            ids = np.concatenate([np.asarray(d + [tok.eos_id], dtype=dtype)
                                  for d in tok.encode_batch(chunk)])
            ids.tofile(f)
            n_tokens += ids.size
            n_docs += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(tokens=n_tokens, refresh=False)
    return n_tokens, n_docs


def _chunks(items: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def meta_path(bin_path: Path | str) -> Path:
    return Path(str(bin_path) + ".json")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------
def load_packed(path: Path | str, *, expect_vocab: int | None = None,
                check_range: bool = True) -> tuple[np.memmap, dict]:
    """Memory-map a packed .bin after checking it against its .json meta."""
    path = Path(path)
    meta = read_meta(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed token file not found: {path}")
    dtype = np.dtype(meta["dtype"])
    expected = meta["n_tokens"] * dtype.itemsize
    if (actual := path.stat().st_size) != expected:
        raise ValueError(f"{path}: size {actual} bytes, but its meta says {meta['n_tokens']} "
                         f"{dtype.name} tokens = {expected} bytes (truncated or re-packed?)")
    if expect_vocab is not None and expect_vocab != meta["vocab_size"]:
        raise ValueError(f"{path}: tokenizer/model vocab mismatch: data packed with vocab "
                         f"{meta['vocab_size']}, model expects {expect_vocab}")
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    if check_range:
        _check_ids(path, tokens, meta["vocab_size"])
    return tokens, meta


def read_meta(path: Path | str) -> dict:
    mpath = meta_path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"packed-data meta not found: {mpath} "
                                "(make it with `jaxttt data pack`)")
    try:
        meta = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: malformed JSON ({e.msg})") from e
    for key in ("vocab_size", "dtype", "n_tokens"):
        if key not in meta:
            raise ValueError(f"{mpath}: missing key {key!r}")
    return meta


def _check_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Scan in blocks so a multi-GB file never lands in memory at once."""
    for start in range(0, tokens.size, _CHECK_CHUNK):
        hi = int(tokens[start:start + _CHECK_CHUNK].max())
        if hi >= vocab_size:
            raise ValueError(f"{path}: token id {hi} out of range for vocab_size {vocab_size} "
                             f"(in tokens {start}..{start + _CHECK_CHUNK})")


# --------------------------------------------------------------------------------------------
# Out-of-the-box data: tokenizer + train/val packs of the embedded default corpus
# --------------------------------------------------------------------------------------------
def default_data_dir(cache_dir: Path | str, vocab_size: int, max_bytes: int) -> Path:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(cache_dir) / f"stdlib-{py}-v{vocab_size}-b{max_bytes}"


def ensure_default_data(cache_dir: Path | str, vocab_size: int, *,
                        max_bytes: int = corpus.DEFAULT_MAX_BYTES,
                        progress: bool = True) -> dict[str, Path]:
    """Tokenizer + packed train/val of the default corpus, built once and cached.

    Safe to call from several processes at once: a file lock lets one build while the others
    wait, then they all read the same files.
    """
    out = default_data_dir(cache_dir, vocab_size, max_bytes)
    paths = dict(tokenizer=out / "tokenizer.model", train=out / "train.bin", val=out / "val.bin")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".lock"):
        if not _default_data_ok(paths):
            print(f"data: building the default corpus (stdlib, {max_bytes} bytes, "
                  f"vocab {vocab_size}) in {out}", flush=True)
            train_tokenizer([f"default:train:{max_bytes}"], out / "tokenizer", vocab_size,
                            code=True)
            for split in ("train", "val"):
                pack(paths["tokenizer"], [f"default:{split}:{max_bytes}"], paths[split],
                     progress=progress)
    return paths


def _default_data_ok(paths: dict[str, Path]) -> bool:
    if not paths["tokenizer"].is_file():
        return False
    sha = Tokenizer(paths["tokenizer"]).sha256
    for split in ("train", "val"):
        try:
            meta = read_meta(paths[split])
        except (FileNotFoundError, ValueError):
            return False
        if meta.get("tokenizer_sha256") != sha or not paths[split].is_file():
            return False
    return True


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
