"""The server's base model and tokenizer from a `--ckpt` spec."""
from __future__ import annotations

from typing import Any


def load_base(spec: str, *, tokenizer: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a run directory (a pretraining run or a converted model), or of a
    named pretrained model (e.g. smollm2-135m-instruct: converted once under the cache root)."""
    from jaxttt.runs import load_run

    model, tok, _ = load_run(spec, tokenizer=tokenizer)
    return model, tok
