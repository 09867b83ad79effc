"""Graders: `grade(questions, predictions) -> list[bool]`, one verdict per question.

SEAL grades with GPT-4.1 (not available offline). The default here is SQuAD-normalised
matching: lower case, punctuation and articles dropped, whitespace collapsed; a prediction is
correct when the normalised gold answer equals it or occurs in it as whole words. An empty
prediction is wrong without being graded, as in SEAL. `--grader module:function` plugs in any
callable with the same signature (e.g. an LLM judge).
"""
from __future__ import annotations

import importlib
import re
import string
from typing import Callable, Sequence

from jaxttt.seal.protocol import Question

Grader = Callable[[Sequence[Question], Sequence[str]], list]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str) -> str:
    """SQuAD answer normalisation (punctuation becomes a space so 'Vel-Ark' ~ 'vel ark')."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def match(gold: str, pred: str) -> bool:
    g, p = normalize(gold), normalize(pred)
    if not g or not p:
        return False
    return g == p or f" {g} " in f" {p} "


def substring_grader(questions: Sequence[Question], predictions: Sequence[str]) -> list[bool]:
    """The default grader: normalised exact or whole-word substring match."""
    return [bool(p.strip()) and match(q.answer, p) for q, p in zip(questions, predictions)]


def load_grader(spec: str | None) -> Grader:
    """`module:function` -> the callable (None -> the default grader)."""
    if not spec:
        return substring_grader
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"--grader: expected module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--grader {spec}: cannot load ({e})") from None
    if not callable(fn):
        raise ValueError(f"--grader {spec}: {fn_name} is not callable")
    return fn


def run_grader(grader: Grader, questions: Sequence[Question],
               predictions: Sequence[str]) -> list[bool]:
    """Verdicts from `grader`, checked: one bool per question (a plugin's mistake is an error)."""
    out = list(grader(list(questions), list(predictions)))
    if len(out) != len(questions) or not all(isinstance(v, bool) for v in out):
        raise TypeError(f"grader {getattr(grader, '__name__', grader)!r} returned "
                        f"{len(out)} values of types {sorted({type(v).__name__ for v in out})}; "
                        f"expected {len(questions)} booleans")
    return out
