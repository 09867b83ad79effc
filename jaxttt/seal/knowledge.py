"""A synthetic knowledge set: short passages about invented entities, 3 questions each.

The entities, places, people and years are drawn from a seeded generator, so no model can
know them beforehand: baseline accuracy measures guessing, adapter accuracy measures what the
fine-tuning put into the weights. Items follow SEAL's SQuAD layout ({title, context,
questions: [{question, answer}]}); `to_request` turns one into a wire request the way SEAL's
`query_server.py` does (questions prefixed with a "Topic:" line; the training sequences are
restatements plus the passage, each "title\\ntext" as in `build_train_sequences`).
"""
from __future__ import annotations

import random
from typing import Any

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "st", "th", "qu", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
_CODAS = ["", "", "n", "r", "s", "l", "th", "x", "m"]
_KINDS = ["glassworks", "observatory", "shipyard", "library", "orchestra", "bakery guild",
          "clockmaker", "botanical garden", "printing house", "weather station"]
_PRODUCTS = ["lantern", "telescope", "compass", "violin", "tapestry", "map", "bell", "kite"]
_COLOURS = ["amber", "cobalt", "crimson", "emerald", "silver", "violet", "saffron", "teal"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def make_item(rng: random.Random) -> dict[str, Any]:
    name = f"{_word(rng, 2)} {rng.choice(_KINDS).title()}"
    founder = f"{_word(rng, 2)} {_word(rng, 3)}"
    town = _word(rng, 3)
    year = str(rng.randint(1400, 1899))
    product = f"{rng.choice(_COLOURS)} {rng.choice(_PRODUCTS)}"
    context = (f"The {name} was founded in {year} by {founder} in the town of {town}. "
               f"It is best known for the {product}, which visitors still come to see.")
    facts = [f"The {name} was founded by {founder}.",
             f"The {name} is located in the town of {town}.",
             f"The {name} was founded in the year {year}.",
             f"The {name} is famous for the {product}."]
    questions = [{"question": f"Who founded the {name}?", "answer": founder},
                 {"question": f"In which town was the {name} founded?", "answer": town},
                 {"question": f"In what year was the {name} founded?", "answer": year}]
    return {"title": name, "context": context, "facts": facts, "questions": questions}


def make_knowledge_set(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """`n` items with distinct titles (deterministic for a seed)."""
    rng = random.Random(seed)
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(items) < n:
        item = make_item(rng)
        if item["title"] not in seen:
            seen.add(item["title"])
            items.append(item)
    return items


def to_request(item: dict[str, Any], **hparams: Any) -> dict[str, Any]:
    """SEAL's wire request for one item (hyper-parameters passed through)."""
    title = item["title"]
    questions = [{"title": title, "context": item["context"],
                  "question": f"Topic: {title}\n{q['question']}", "answer": q["answer"]}
                 for q in item["questions"]]
    seqs = [f"{title}\n{fact}" for fact in item["facts"]] + [f"{title}\n{item['context']}"]
    return {"train_sequences": seqs, "eval_questions": questions, **hparams}
