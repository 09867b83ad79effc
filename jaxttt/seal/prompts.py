"""Answer prompts and training rows, as SEAL's server builds them.

Answer prompts: SEAL's base template, or, for an instruct model, its system line and the
question as the user turn rendered with the tokenizer's own chat template (SEAL hard-codes
Qwen's ChatML; here the tokenizer decides). Training rows: each sequence is tokenized as a
document starts (the tokenizer's `prompt_ids`), ends with EOS (SEAL pads with EOS and trains
on it), is truncated to the model window, and with `end_mask_substring` its labels up to and
including the first match are masked.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# knowledge-incorporation/src/utils.py: SQUAD_ANSWER_TEMPLATE_BASE
ANSWER_TEMPLATE_BASE = ("Let's answer a question directly and concisely.\n"
                        "Question: {question}\n"
                        "Answer:\n")
# the system line of SQUAD_ANSWER_TEMPLATE_QWEN_INSTRUCT
ANSWER_SYSTEM = "You are an assistant to answer a question directly and concisely."
PROMPT_STYLES = ("auto", "base", "chat")


def has_chat_template(tok: Any) -> bool:
    """Whether the tokenizer can render chat messages (an instruct model's tokenizer)."""
    return bool(getattr(tok, "chat_template", None)) and callable(getattr(tok, "chat_ids", None))


def resolve_style(tok: Any, style: str) -> str:
    """'auto' -> 'chat' when the tokenizer has a chat template, else 'base'."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"--prompt: expected one of {'|'.join(PROMPT_STYLES)}, got {style!r}")
    if style == "auto":
        return "chat" if has_chat_template(tok) else "base"
    if style == "chat" and not has_chat_template(tok):
        raise ValueError("--prompt chat: this tokenizer has no chat template")
    return style


def document_ids(tok: Any, text: str) -> list[int]:
    """`text` tokenized as the model saw documents start (the tokenizer's `prompt_ids`: EOS
    or BOS first where the model was trained so), else plain `encode`."""
    fn = getattr(tok, "prompt_ids", None)
    return list(fn(text)) if callable(fn) else list(tok.encode(text))


def answer_prompt_ids(tok: Any, question: str, style: str) -> list[int]:
    """Token ids of the answer prompt for one question (`style` already resolved)."""
    if style == "base":
        return document_ids(tok, ANSWER_TEMPLATE_BASE.format(question=question))
    messages = [{"role": "system", "content": ANSWER_SYSTEM},
                {"role": "user", "content": question}]
    return [int(i) for i in tok.chat_ids(messages, add_generation_prompt=True)]


def stop_id(tok: Any) -> int:
    """The token that ends an answer: EOS (an instruct tokenizer's EOS is its end of turn)."""
    return int(tok.eos_id)


# ------------------------------------------------------------------------------ training
def mask_end(tok: Any, ids: Sequence[int], text: str, sub: str | None) -> int:
    """Number of leading tokens whose labels are masked: the shortest prefix of `ids` whose
    text contains `sub` (0 when `sub` is empty or absent), found by bisection on decodes."""
    if not sub or sub not in text:
        return 0
    if sub not in tok.decode(list(ids)):  # the tokenizer does not round-trip it: no masking
        return 0
    lo, hi = 1, len(ids)
    while lo < hi:  # smallest k with sub in decode(ids[:k]); containment grows with k
        mid = (lo + hi) // 2
        if sub in tok.decode(list(ids[:mid])):
            hi = mid
        else:
            lo = mid + 1
    return lo


def train_rows(tok: Any, sequences: Sequence[str], max_len: int,
               end_mask_substring: str | None) -> list[tuple[list[int], int]]:
    """(ids, n_masked) per sequence: the document's tokens + EOS, cut to `max_len` tokens,
    labels of the first n_masked tokens masked."""
    rows = []
    for seq in sequences:
        ids = document_ids(tok, seq)[: max_len - 1] + [int(tok.eos_id)]
        rows.append((ids, mask_end(tok, ids[:-1], seq, end_mask_substring)))
    return rows


def pack_rows(rows: list[tuple[list[int], int]], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded next-token arrays: tokens [R, W], targets [R, W], mask [R, W] (1 where the
    target is a trained label: not masked by the substring, not padding)."""
    R = len(rows)
    toks = np.full((R, width + 1), pad_id, np.int32)
    mask = np.zeros((R, width), np.float32)
    for r, (ids, n_masked) in enumerate(rows):
        toks[r, :len(ids)] = ids
        # position t predicts token t+1: trained iff t+1 >= n_masked and t+1 < len(ids)
        mask[r, max(n_masked - 1, 0):len(ids) - 1] = 1.0
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}
