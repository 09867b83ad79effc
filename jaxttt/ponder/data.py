"""Chunks of a packed token stream for PonderTTT (default: the embedded code corpus)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxttt.data.loader import WindowSource
from jaxttt.errors import UserError


def default_bin(tokenizer, split: str) -> Path:
    """The default corpus' `split` packed with `tokenizer` (built once and cached by its sha)."""
    from jaxttt.eval.report import default_heldout

    if split == "val":
        return default_heldout(tokenizer)
    from jaxttt.data import corpus
    from jaxttt.data.packing import _locked, default_data_dir, pack, read_meta
    from jaxttt.runs import cache_root

    cache = cache_root() / "data"
    built = default_data_dir(cache, tokenizer.vocab_size, corpus.DEFAULT_MAX_BYTES) / "train.bin"
    out = cache / f"ponder-{tokenizer.sha256[:16]}" / "train.bin"
    for path in (built, out):
        if _packed_with(path, tokenizer.sha256, read_meta):
            return path
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent / ".lock"):
        if not _packed_with(out, tokenizer.sha256, read_meta):
            pack(tokenizer.path, [f"default:train:{corpus.DEFAULT_MAX_BYTES}"], out, progress=False)
    return out


def _packed_with(path: Path, sha: str, read_meta) -> bool:
    try:
        return path.is_file() and read_meta(path).get("tokenizer_sha256") == sha
    except (FileNotFoundError, ValueError):
        return False


def consecutive_chunks(bin_path: Path | str, chunk_len: int, n: int, *, start: int = 0,
                       vocab: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x [n,T], y [n,T]): the windows start, start+1, ... of the stream (consecutive text)."""
    src = WindowSource(bin_path, chunk_len, expect_vocab=vocab)
    if len(src) < n:
        raise UserError(f"{bin_path}: {len(src)} chunks of {chunk_len} tokens, {n} needed "
                        "(lower `chunks`/`train_chunks` or use a larger packed file)")
    start = start % max(len(src) - n + 1, 1)
    items = [src[start + i] for i in range(n)]
    return np.stack([it["x"] for it in items]), np.stack([it["y"] for it in items])
