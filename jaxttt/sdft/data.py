"""SDFT examples: (prompt, demonstration) pairs from JSON Lines, the two prompt framings and
their token ids (raw text, or a user turn of an instruct model's chat template).

File format (handoff, SDFT §7): one JSON object per line,
`{"prompt": "...", "demonstration": "...", ...}`; any extra keys (reward, source, problem id)
are kept in `Example.meta`. Blank lines are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterable

from jaxttt.data.chat_prompts import chat_prompt_ids
from jaxttt.eval.report import encode_prompt

REQUIRED = ("prompt", "demonstration")


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str  # the question x
    demonstration: str  # a good response c (teacher conditioning only)
    meta: dict = dataclasses.field(default_factory=dict)  # extra JSON keys, kept as read

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this example (meta keys flattened back in)."""
        return {**self.meta, "prompt": self.prompt, "demonstration": self.demonstration}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Example:
        meta = {k: v for k, v in obj.items() if k not in REQUIRED}
        return cls(prompt=obj["prompt"], demonstration=obj["demonstration"], meta=meta)


def teacher_prompt(prompt: str, demonstration: str) -> str:
    """The SDFT paper's teacher template (handoff SDFT §3), verbatim."""
    return (
        "<Question>\n"
        f"{prompt}\n"
        "\n"
        "This is an example for a response to the question:\n"
        "<Demonstration>\n"
        f"{demonstration}\n"
        "\n"
        "Now answer with a response of your own, including the thinking process:\n"
    )


def student_prompt(prompt: str) -> str:
    """The student sees the prompt exactly as written (as in the reference implementation)."""
    return prompt


def encode_contexts(tokenizer, ex: Example, s_len: int, t_len: int,
                    chat: bool = False) -> tuple[list[int], list[int]]:
    """(student, teacher) prompt ids of `ex`, at most `s_len` / `t_len` tokens (left-truncated):
    `[EOS] + text`, or with `chat` (an instruct model) each text as one user turn of the
    tokenizer's chat template followed by its generation prompt."""
    texts = student_prompt(ex.prompt), teacher_prompt(ex.prompt, ex.demonstration)
    encode = chat_prompt_ids if chat else encode_prompt
    return encode(tokenizer, texts[0], s_len), encode(tokenizer, texts[1], t_len)


def _parse_line(line: str, where: str) -> Example:
    """One JSONL line -> Example, or ValueError naming `where` and what was expected."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                         'expected an object like {"prompt": "...", "demonstration": "..."}') from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys 'prompt' and 'demonstration', "
                         f"got {type(obj).__name__}")
    for key in REQUIRED:
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r} (expected a string)")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {type(obj[key]).__name__}")
    if not obj["demonstration"].strip():
        raise ValueError(f"{where}: key 'demonstration' is empty (expected a non-empty string)")
    return Example.from_dict(obj)


def load_jsonl(path: str | Path, *, skip_bad: bool = False) -> tuple[list[Example], int]:
    """Read SDFT examples; returns (examples, n_skipped).

    A bad line raises ValueError naming the file and its 1-based line number, unless
    `skip_bad`, in which case it is skipped, counted, and one summary warning is issued.
    """
    examples: list[Example] = []
    bad: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_line(line, f"{path}:{lineno}"))
            except ValueError as e:
                if not skip_bad:
                    raise
                bad.append(str(e))
    if bad:
        shown = "\n  ".join(bad[:5]) + ("\n  ..." if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad)} bad line(s), kept {len(examples)}:\n  {shown}",
                      stacklevel=2)
    return examples, len(bad)


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> int:
    """Write examples as JSON Lines (the inverse of `load_jsonl`); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n
