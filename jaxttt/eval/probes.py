"""Capability probes (handoff Phase 12): prompts with substring/regex checks on greedy output.

Probe file: a YAML list, each entry
    - name: arith            # unique
      prompt: "2 + 2 ="
      expect:                # one or more checks, all must hold; each a string or a list
        substring: "4"       # must occur in the completion
        regex: "\\b4\\b"     # re.search must match
        not_substring: "5"   # must not occur
      weight: 1.0            # optional, > 0 (default 1)
Unknown keys are errors naming the file, the entry index and the key.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from jaxttt.eval.gates import PROBE_PREFIX

ENTRY_KEYS = ("name", "prompt", "expect", "weight")
EXPECT_KEYS = ("substring", "regex", "not_substring")
OVERALL = "overall"


@dataclasses.dataclass(frozen=True)
class Probe:
    name: str
    prompt: str
    substring: tuple[str, ...] = ()  # all must occur
    regex: tuple[re.Pattern, ...] = ()  # all must match (re.search)
    not_substring: tuple[str, ...] = ()  # none may occur
    weight: float = 1.0

    def check(self, completion: str) -> bool:
        return (all(s in completion for s in self.substring)
                and all(r.search(completion) for r in self.regex)
                and not any(s in completion for s in self.not_substring))


def _strings(value: Any, where: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: expected a string or a non-empty list of strings, got {value!r}")
    return tuple(values)


def _parse_expect(expect: Any, where: str) -> dict[str, tuple]:
    if not isinstance(expect, dict) or not expect:
        raise ValueError(f"{where}: expected a mapping with one or more of {list(EXPECT_KEYS)}, "
                         f"got {expect!r}")
    checks: dict[str, tuple] = {}
    for key, value in expect.items():
        if key not in EXPECT_KEYS:
            raise ValueError(f"{where}: unknown check {key!r} (known: {', '.join(EXPECT_KEYS)})")
        checks[key] = _strings(value, f"{where}.{key}")
    try:
        checks["regex"] = tuple(re.compile(p) for p in checks.get("regex", ()))
    except re.error as e:
        raise ValueError(f"{where}.regex: invalid regular expression {e.pattern!r}: {e}") from None
    return checks


def _parse_entry(entry: Any, where: str) -> Probe:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with keys {list(ENTRY_KEYS)}, got {entry!r}")
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(ENTRY_KEYS)})")
    for key in ("name", "prompt"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ValueError(f"{where}: key {key!r} must be a non-empty string, got {entry.get(key)!r}")
    if "expect" not in entry:
        raise ValueError(f"{where}: missing key 'expect'")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"{where}: key 'weight' must be a positive number, got {weight!r}")
    checks = _parse_expect(entry["expect"], f"{where}: expect")
    return Probe(name=entry["name"], prompt=entry["prompt"], weight=float(weight), **checks)


def load_probes(path: str | Path) -> list[Probe]:
    """Parse and validate a probe file; errors name the file, the entry index and the key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty YAML list of probes, got {type(data).__name__}")
    probes = [_parse_entry(entry, f"{path}: probe #{i}") for i, entry in enumerate(data)]
    seen: set[str] = set()
    for i, p in enumerate(probes):
        if p.name in seen or p.name == OVERALL:
            why = "is reserved" if p.name == OVERALL else "is a duplicate"
            raise ValueError(f"{path}: probe #{i}: key 'name': {p.name!r} {why}")
        seen.add(p.name)
    return probes


def score_probes(probes: Sequence[Probe],
                 generate_fn: Callable[[list[str]], list[str]]) -> dict[str, Any]:
    """Run all prompts in one `generate_fn` call (greedy completions) and score them.

    Returns {"overall": weighted pass rate in [0, 1], "passed": {name: bool},
             "completions": {name: str}, "n_passed": int, "n_probes": int}.
    """
    completions = list(generate_fn([p.prompt for p in probes]))
    if len(completions) != len(probes):
        raise ValueError(f"generate_fn returned {len(completions)} completions "
                         f"for {len(probes)} prompts")
    passed = {p.name: p.check(c) for p, c in zip(probes, completions)}
    total = sum(p.weight for p in probes)
    overall = sum(p.weight for p in probes if passed[p.name]) / total if total else 0.0
    return {OVERALL: overall, "passed": passed,
            "completions": {p.name: c for p, c in zip(probes, completions)},
            "n_passed": sum(passed.values()), "n_probes": len(probes)}


def probe_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """Flatten `score_probes` output into gate metrics: probe/overall and probe/<name> (0 or 1)."""
    out = {PROBE_PREFIX + OVERALL: float(scores[OVERALL])}
    out.update({PROBE_PREFIX + name: float(ok) for name, ok in scores["passed"].items()})
    return out
