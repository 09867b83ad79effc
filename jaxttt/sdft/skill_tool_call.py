"""A new skill for SDFT vs SFT: answer a request with one tool call in a fixed format.

The model sees a plain request ("What's the weather in Oslo, in celsius?") and must reply with
exactly

    <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>

and nothing else. The prompt names the tools but never shows the format, so a model that was
not taught it has to guess the tag and the JSON shape (SmolLM2-135M-Instruct scores 0).

`make_split(seed, n_train, n_test)` builds the examples deterministically; the train and
held-out splits use disjoint argument values (cities, contacts, currency pairs, numbers), so a
held-out request never repeats a training call. `grade(output, expected)` is the parser that
scores a completion: exact format (the whole output, whitespace-trimmed, is one tag pair around
one JSON object with exactly the keys name and arguments) and correct arguments (name and
arguments equal to the expected call, types included: 10 is not "10").
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

import numpy as np

from jaxttt.sdft.data import Example

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_OUTPUT_CHARS = 2000  # longer outputs are graded malformed without parsing
TOOLS_LINE = ("Tools: get_weather(city, unit), set_timer(minutes), "
              "convert_currency(amount, source, target), send_message(contact, text).")

# Argument pools; index parity splits each into train (even) / held-out (odd) values.
CITIES = ("Paris", "Oslo", "Madrid", "Tokyo", "Lima", "Cairo", "Berlin", "Dublin", "Seoul",
          "Quito", "Rome", "Nairobi", "Vienna", "Lisbon", "Denver", "Hanoi", "Prague", "Perth",
          "Boston", "Delhi", "Athens", "Manila", "Zurich", "Havana")
UNITS = ("celsius", "fahrenheit")
CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "CAD", "AUD", "SEK")
CONTACTS = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan",
            "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil")
TEXTS = ("running late", "call me back", "see you soon", "lunch at noon", "meeting moved",
         "happy birthday", "on my way", "thanks a lot", "good luck today", "dinner is ready")

TEMPLATES = {
    "get_weather": ("What's the weather in {city}, in {unit}?",
                    "Tell me the current temperature in {city} in {unit}.",
                    "How warm is it in {city} right now? Use {unit}."),
    "set_timer": ("Set a timer for {minutes} minutes.",
                  "Start a {minutes} minute timer please.",
                  "Remind me in {minutes} minutes."),
    "convert_currency": ("Convert {amount} {source} to {target}.",
                         "How much is {amount} {source} in {target}?",
                         "Change {amount} {source} into {target} for me."),
    "send_message": ("Send {contact} a message saying \"{text}\".",
                     "Text {contact}: \"{text}\".",
                     "Message {contact} with \"{text}\"."),
}
TOOLS = tuple(TEMPLATES)
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Grade:
    format_ok: bool  # the output is exactly one well-formed call (any name and arguments)
    correct: bool  # format_ok and the call equals the expected one
    reason: str  # "ok" or why not


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def format_call(name: str, arguments: dict[str, Any]) -> str:
    """The one correct rendering of a call (the demonstration text)."""
    return f"{OPEN}{json.dumps({'name': name, 'arguments': arguments})}{CLOSE}"


def _half(pool: Sequence, split: str) -> list:
    return [v for i, v in enumerate(pool) if i % 2 == (0 if split == "train" else 1)]


def _numbers(lo: int, hi: int, split: str) -> list[int]:
    return [n for n in range(lo, hi) if n % 2 == (0 if split == "train" else 1)]


def _arguments(tool: str, split: str, rng: np.random.Generator) -> dict[str, Any]:
    pick = lambda pool: pool[int(rng.integers(len(pool)))]  # noqa: E731
    if tool == "get_weather":
        return {"city": pick(_half(CITIES, split)), "unit": pick(UNITS)}
    if tool == "set_timer":
        return {"minutes": pick(_numbers(2, 60, split))}
    if tool == "convert_currency":
        # train: source currency from the even half; held-out: from the odd half
        source = pick(_half(CURRENCIES, split))
        target = pick([c for c in CURRENCIES if c != source])
        return {"amount": pick(_numbers(5, 500, split)), "source": source, "target": target}
    return {"contact": pick(_half(CONTACTS, split)), "text": pick(TEXTS)}


def make_example(tool: str, split: str, rng: np.random.Generator) -> Example:
    args = _arguments(tool, split, rng)
    template = TEMPLATES[tool][int(rng.integers(len(TEMPLATES[tool])))]
    prompt = f"{TOOLS_LINE}\n{template.format(**args)}"
    return Example(prompt=prompt, demonstration=format_call(tool, args),
                   meta={"tool": tool, "arguments": args, "split": split})


def make_examples(split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of `split`, the tools in turn; the same for the same (split, n, seed)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    out, seen = [], set()
    for attempt in range(50 * n):
        if len(out) == n:
            break
        ex = make_example(TOOLS[len(out) % len(TOOLS)], split, rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    if len(out) < n:
        raise ValueError(f"cannot make {n} distinct {split} examples (made {len(out)})")
    return out


def make_split(seed: int = 0, n_train: int = 200, n_test: int = 30) -> tuple[list[Example], list[Example]]:
    return make_examples("train", n_train, seed), make_examples("test", n_test, seed)


# ---------------------------------------------------------------------------------------------
# Grader
# ---------------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"non-JSON constant {name}")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def parse_call(output: str) -> tuple[dict | None, str]:
    """(call, "ok") if `output` is exactly one well-formed call, else (None, reason)."""
    if not isinstance(output, str):
        return None, "not a string"
    if len(output) > MAX_OUTPUT_CHARS:
        return None, "output too long"
    text = output.strip()
    if not text.startswith(OPEN):
        return None, "extra text before the call" if OPEN in text else "no <tool_call> tag"
    if not text.endswith(CLOSE):
        return None, "extra text after the call" if CLOSE in text else "no </tool_call> tag"
    body = text[len(OPEN):-len(CLOSE)]
    if OPEN in body or CLOSE in body:
        return None, "more than one tag pair"
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None, "payload is not valid JSON"
    if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
        return None, "payload must be an object with exactly the keys name and arguments"
    if not isinstance(obj["name"], str) or not isinstance(obj["arguments"], dict):
        return None, "name must be a string and arguments an object"
    return obj, "ok"


def _same(a: Any, b: Any) -> bool:
    """Equal values with equal JSON types (True is not 1, 10 is not 10.0 or "10")."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def grade(output: str, name: str, arguments: dict[str, Any]) -> Grade:
    """Score one completion against the expected call."""
    call, why = parse_call(output)
    if call is None:
        return Grade(False, False, why)
    if call["name"] != name:
        return Grade(True, False, f"wrong tool {call['name']!r}")
    if not _same(call["arguments"], arguments):
        return Grade(True, False, "wrong arguments")
    return Grade(True, True, "ok")


def grade_example(output: str, ex: Example) -> Grade:
    return grade(output, ex.meta["tool"], ex.meta["arguments"])


def score(outputs: Sequence[str], examples: Sequence[Example]) -> dict[str, Any]:
    """Accuracy (exact format + correct call) and format rate over a set, with the reasons."""
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} outputs for {len(examples)} examples")
    grades = [grade_example(o, e) for o, e in zip(outputs, examples)]
    n = max(len(grades), 1)
    reasons: dict[str, int] = {}
    for g in grades:
        reasons[g.reason] = reasons.get(g.reason, 0) + 1
    return {"accuracy": sum(g.correct for g in grades) / n,
            "format": sum(g.format_ok for g in grades) / n, "n": len(grades),
            "reasons": dict(sorted(reasons.items()))}


_WS = re.compile(r"\s+")


def short(text: str, n: int = 120) -> str:
    """One-line preview of an output (reports)."""
    t = _WS.sub(" ", text).strip()
    return t if len(t) <= n else t[:n - 1] + "…"
