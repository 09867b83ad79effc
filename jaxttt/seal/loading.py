"""The server's base model and tokenizer from a `--ckpt` spec."""
from __future__ import annotations

from typing import Any


def load_base(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a run directory or converted model (via `jaxttt.runs.load_run`
    when the run layer is present, else a pretraining checkpoint and its SentencePiece model)."""
    try:
        from jaxttt.runs import load_run
    except ImportError:
        load_run = None
    if load_run is not None:
        model, tok, _ = load_run(spec)
        return model, tok
    from jaxttt.data.tokenizer import Tokenizer
    from jaxttt.train.checkpoint import CheckpointError, load_model

    try:
        model, meta = load_model(spec)
    except CheckpointError as e:
        raise ValueError(f"--ckpt: {e}") from None
    if not meta.get("tokenizer"):
        raise ValueError(f"--ckpt {spec}: the checkpoint names no tokenizer")
    return model, Tokenizer(meta["tokenizer"])
