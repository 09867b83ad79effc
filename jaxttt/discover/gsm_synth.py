"""GSM-style templated word problems with exact integer answers (offline stand-in for GSM8K).

    rows = generate_problems(32, seed=0)      # [{"question": ..., "answer": "...\\n#### 42"}, ...]

Each problem is a short story about one quantity (items a person has, money in a wallet,
pages read): an opening value, then `steps` operations (buy more, give away, multiply, share
equally, earn per day, pay per item), then a question. Every intermediate value is a
non-negative integer, divisions are exact, and the answer is worked in GSM8K's format: one
line per operation (`24 + 18 = 42`) and the final `#### <number>`. Names, items, numbers,
operation order and the number of steps vary with the seed; the same seed gives the same rows.
"""
from __future__ import annotations

import random
from typing import Callable

NAMES = ("Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Liam", "Priya", "Diego",
         "Hana", "Noah", "Fatima", "Ivan", "Chloe", "Mateo", "Zara", "Elijah", "Mei", "Samuel")
PRONOUN = {"Maria": "She", "Tom": "He", "Aisha": "She", "Kenji": "He", "Lena": "She",
           "Omar": "He", "Sofia": "She", "Liam": "He", "Priya": "She", "Diego": "He",
           "Hana": "She", "Noah": "He", "Fatima": "She", "Ivan": "He", "Chloe": "She",
           "Mateo": "He", "Zara": "She", "Elijah": "He", "Mei": "She", "Samuel": "He"}
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells",
         "cards", "beads", "oranges", "toy cars")
CONTAINERS = ("boxes", "bags", "baskets", "jars", "crates")
WORDS = {2: "doubles", 3: "triples"}


def fmt(n: int) -> str:
    """Thousands separators as GSM8K questions write them (1,150)."""
    return f"{n:,}"


class _Story:
    """A quantity being changed step by step; collects question sentences and worked lines."""

    def __init__(self, rng: random.Random, name: str, value: int, unit: str):
        self.rng, self.name, self.he, self.value, self.unit = rng, name, PRONOUN[name], value, unit
        self.sentences: list[str] = []
        self.lines: list[str] = []

    def apply(self, sentence: str, expr: str, new_value: int) -> None:
        self.sentences.append(sentence)
        self.lines.append(f"{expr} = {new_value}.")
        self.value = new_value


# ---- operations: each returns False when it does not apply to the current value ------------
def _buy(s: _Story) -> bool:
    b = s.rng.randint(2, 60)
    s.apply(f"{s.he} gets {fmt(b)} more {s.unit}.", f"{s.value} + {b}", s.value + b)
    return True


def _give(s: _Story) -> bool:
    if s.value < 2:
        return False
    b = s.rng.randint(1, s.value - 1)
    friend = s.rng.choice([n for n in NAMES if n != s.name])
    s.apply(f"{s.he} gives {fmt(b)} {s.unit} to {friend}.", f"{s.value} - {b}", s.value - b)
    return True


def _multiply(s: _Story) -> bool:
    k = s.rng.choice((2, 3))
    if s.value * k > 100_000:
        return False
    s.apply(f"Then {s.he.lower()} {WORDS[k]} the number of {s.unit} {s.he.lower()} has.",
            f"{s.value} * {k}", s.value * k)
    return True


def _share(s: _Story) -> bool:
    divisors = [k for k in range(2, 10) if s.value % k == 0 and s.value // k >= 1]
    if not divisors:
        return False
    k = s.rng.choice(divisors)
    box = s.rng.choice(CONTAINERS)
    s.apply(f"{s.he} puts them equally into {k} {box} and keeps only one of the {box}.",
            f"{s.value} / {k}", s.value // k)
    return True


def _daily(s: _Story) -> bool:
    per, days = s.rng.randint(2, 15), s.rng.randint(2, 9)
    s.apply(f"For the next {days} days {s.he.lower()} collects {per} {s.unit} every day.",
            f"{s.value} + {per} * {days}", s.value + per * days)
    return True


OPERATIONS: tuple[Callable[[_Story], bool], ...] = (_buy, _give, _multiply, _share, _daily)


# ---- closing questions -----------------------------------------------------------------------
def _ask_count(s: _Story) -> str:
    return f"How many {s.unit} does {s.name} have now?"


def _ask_money(s: _Story) -> str:
    price = s.rng.randint(2, 12)
    total = s.value * price
    s.lines.append(f"At ${price} each they are worth {s.value} * {price} = {total} dollars.")
    s.value = total
    return f"If each of them sells for ${price}, how many dollars are all of {s.name}'s {s.unit} worth?"


def make_problem(rng: random.Random, steps: int) -> dict[str, str]:
    """One problem with `steps` operations (a money question adds one more step)."""
    name, unit = rng.choice(NAMES), rng.choice(ITEMS)
    story = _Story(rng, name, rng.randint(5, 1500), unit)
    opening = f"{name} has {fmt(story.value)} {unit}."
    while len(story.lines) < steps:
        op = rng.choice(OPERATIONS)
        op(story)
    ask = _ask_money if rng.random() < 0.3 else _ask_count
    question = " ".join([opening, *story.sentences, ask(story)])
    answer = "\n".join(story.lines + [f"#### {story.value}"])
    return {"question": question, "answer": answer}


def generate_problems(n: int, *, seed: int = 0, min_steps: int = 1, max_steps: int = 4) -> list[dict[str, str]]:
    """`n` distinct problems (question/answer rows in GSM8K's JSONL format), deterministic in
    `seed`, with a number of operations drawn uniformly from [min_steps, max_steps]."""
    if n < 0 or not 1 <= min_steps <= max_steps:
        raise ValueError(f"gsm_synth: need n >= 0 and 1 <= min_steps <= max_steps, got n={n}, "
                         f"min_steps={min_steps}, max_steps={max_steps}")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        row = make_problem(rng, rng.randint(min_steps, max_steps))
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows
