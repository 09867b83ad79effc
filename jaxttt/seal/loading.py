"""The server's base model and tokenizer from a `--ckpt` spec."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_base(spec: str, *, tokenizer: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a run directory (a pretraining run or a converted model), or of a
    named pretrained model (e.g. smollm2-135m-instruct: converted once under the cache root)."""
    from jaxttt.model import named
    from jaxttt.runs import load_run

    if spec in named.NAMED and not Path(spec).exists():
        from jaxttt.model.pretrained import ensure_named_run
        spec = str(ensure_named_run(spec))
    model, tok, _ = load_run(spec, tokenizer=tokenizer)
    return model, tok
