"""Offline long-context SFT data for head training: facts hidden in the interpreter's own documentation, asked about in
a multi-turn chat. No download; deterministic per seed (and Python version, which fixes ``pydoc_data.topics``).

Disjointness from evaluation (keep it when writing evaluation tasks):

- **text**: ``pydoc_data.topics`` keys sorted; training uses the first ``TRAIN_TOPIC_FRACTION`` (70%) of them
  (:func:`topic_keys` ``("train")``), evaluation must use the rest (``topic_keys("eval")``);
- **seeds**: training samples use seeds ``TRAIN_SEED_BASE + i`` (1_000_000 and up); evaluation uses seeds below it;
- **phrasing**: subjects, names and cities below are not those of ``gatekv.eval.needle`` ("the archive", "the vault",
  ...), so a needle evaluation also tests held-out phrasing.

A sample is a chat: user = context (512-2000 tokens of documentation sentences with 1-4 inserted facts) + "\\n\\n" +
a question; assistant = the answer; then more question/answer turns (80% of samples ask about every fact). With
``prompt_split: last_paragraph`` the context is the prompt and every question and answer is a future query.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TRAIN_SEED_BASE",
    "TRAIN_TOPIC_FRACTION",
    "SyntheticSample",
    "make_sample",
    "make_samples",
    "sentences",
    "topic_keys",
    "write_jsonl",
]

TRAIN_TOPIC_FRACTION = 0.7
"""Training text: the first 70% of the sorted ``pydoc_data.topics`` keys; evaluation uses the remaining 30%."""
TRAIN_SEED_BASE = 1_000_000
"""Training sample i uses seed ``TRAIN_SEED_BASE + i``; evaluation seeds must stay below."""

_SUBJECTS = (
    "the garage", "the wine cellar", "the tool shed", "the laboratory", "the mailroom", "the storage unit",
    "the bike lock", "the attic", "the chess club locker", "the greenhouse gate", "the cloud console", "the ferry office",
)
_PEOPLE = ("Amira", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Juno", "Kemal", "Lena",
           "Mateo", "Nadia", "Oskar", "Priya", "Quinn", "Rosa", "Sami", "Tove")
_CITIES = ("Porto", "Tbilisi", "Quito", "Bergen", "Hobart", "Valletta", "Kyoto", "Tartu", "Dakar", "Ljubljana", "Cusco")
_COLOURS = ("teal", "amber", "crimson", "olive", "lilac", "indigo", "ochre", "turquoise", "maroon", "silver")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TEAMS = ("design", "budget", "hiring", "security", "quarterly planning", "garden committee", "choir")
_PETS = ("Biscuit", "Pepper", "Mochi", "Zorro", "Clover", "Nutmeg", "Pixel", "Waffles")

# numeric facts: (statement, question, answer) templates over {s} subject / {p} person and {n} the number
_NUMERIC = (
    ("The access code for {s} is {n}.", "What is the access code for {s}?", "The access code for {s} is {n}."),
    ("Remember that the PIN of {s} is {n}.", "What is the PIN of {s}?", "The PIN of {s} is {n}."),
    ("To open {s}, enter the code {n}.", "Which code opens {s}?", "The code {n} opens {s}."),
    ("The serial number printed on {s} is {n}.", "What serial number is printed on {s}?", "It is {n}."),
    ("{p}'s employee number is {n}.", "What is {p}'s employee number?", "{p}'s employee number is {n}."),
    ("The passcode that unlocks {s} is {n}.", "Which passcode unlocks {s}?", "The passcode is {n}."),
    ("Write this down: the combination of {s} is {n}.", "What is the combination of {s}?", "The combination of {s} is {n}."),
    ("The tracking number for the parcel sent to {p} is {n}.", "What is the tracking number of {p}'s parcel?", "The tracking number is {n}."),
    ("{p} can be reached at phone extension {n}.", "At which extension can {p} be reached?", "{p} can be reached at extension {n}."),
    ("The booking reference for {p}'s trip is {n}.", "What is the booking reference of {p}'s trip?", "The booking reference is {n}."),
)


@dataclass
class SyntheticSample:
    """One generated chat sample."""

    messages: list[dict[str, str]]
    """Chat turns ``[{"role": "user" | "assistant", "content": str}]``; the first user turn = context + "\\n\\n" + question."""
    facts: list[dict[str, str]]
    """The inserted facts: ``{"statement", "question", "answer", "kind"}``."""
    seed: int
    context_tokens: int
    """Tokens of the context (as counted when building it)."""

    def to_record(self) -> dict:
        return {"messages": self.messages, "meta": {"seed": self.seed, "facts": self.facts,
                                                   "context_tokens": self.context_tokens, "part": "train"}}


def topic_keys(part: str) -> list[str]:
    """Sorted ``pydoc_data.topics`` keys of ``part``: ``train`` (first 70%) or ``eval`` (the rest)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * TRAIN_TOPIC_FRACTION)
    if part == "train":
        return keys[:cut]
    if part == "eval":
        return keys[cut:]
    raise ValueError(f"part must be 'train' or 'eval', got {part!r}")


@functools.lru_cache(maxsize=2)
def sentences(part: str = "train") -> tuple[str, ...]:
    """Prose sentences (40-250 characters, no digits or code symbols) of the ``part``'s topics, in a fixed order.

    Some sentences occur in several topics: the training part drops every sentence that also occurs in the
    evaluation part, so the two never share a sentence.
    """
    if part == "train":
        held_out = set(_part_sentences("eval"))
        return tuple(s for s in _part_sentences("train") if s not in held_out)
    return _part_sentences(part)


def _part_sentences(part: str) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in topic_keys(part)))
    pieces = re.split(r"(?<=[.!?])\s+", text)
    return tuple(
        s for s in pieces
        if 40 <= len(s) <= 250 and s[0].isupper() and s.endswith(".") and not re.search(r"[0-9*=<>\[\]{}`|_\\]", s)
    )


def _fact(rng: random.Random, numeric_share: float, used_numbers: set[str]) -> dict[str, str]:
    subject, person = rng.choice(_SUBJECTS), rng.choice(_PEOPLE)
    if rng.random() < numeric_share:
        statement, question, answer = rng.choice(_NUMERIC)
        while True:
            digits = rng.randint(4, 7)
            number = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
            if number not in used_numbers:
                used_numbers.add(number)
                break
        fill = dict(s=subject, p=person, n=number)
        return {"kind": "numeric", "statement": statement.format(**fill), "question": question.format(**fill),
                "answer": answer.format(**fill)}
    kind = rng.choice(("city", "colour", "day", "pet"))
    if kind == "city":
        city = rng.choice(_CITIES)
        return {"kind": kind, "statement": f"{person} moved to {city} last spring and still lives there.",
                "question": f"Where does {person} live?", "answer": f"{person} lives in {city}."}
    if kind == "colour":
        colour = rng.choice(_COLOURS)
        return {"kind": kind, "statement": f"{person}'s favourite colour is {colour}.",
                "question": f"What is {person}'s favourite colour?", "answer": f"{person}'s favourite colour is {colour}."}
    if kind == "day":
        team, day = rng.choice(_TEAMS), rng.choice(_DAYS)
        return {"kind": kind, "statement": f"The {team} meeting always takes place on {day}.",
                "question": f"On which day is the {team} meeting?", "answer": f"The {team} meeting is on {day}."}
    pet = rng.choice(_PETS)
    return {"kind": kind, "statement": f"{person} has a dog called {pet}.",
            "question": f"What is the name of {person}'s dog?", "answer": f"{person}'s dog is called {pet}."}


def make_sample(
    seed: int,
    count_tokens,
    min_tokens: int = 512,
    max_tokens: int = 2000,
    part: str = "train",
    numeric_share: float = 0.7,
    ask_all_share: float = 0.8,
    num_facts: tuple[int, int] = (1, 4),
) -> SyntheticSample:
    """One sample for ``seed``.

    count_tokens: ``list[str] -> list[int]`` token counts of texts (e.g. from the model's tokenizer)
    min_tokens, max_tokens: the context's length in tokens is drawn uniformly in this range
    num_facts: (low, high) facts inserted (uniform); every fact is asked with probability ``ask_all_share``
    """
    rng = random.Random(seed)
    pool = sentences(part)
    lengths = _sentence_lengths(part, count_tokens)
    used_numbers: set[str] = set()
    facts = [_fact(rng, numeric_share, used_numbers) for _ in range(rng.randint(*num_facts))]
    fact_lengths = count_tokens([" " + f["statement"] for f in facts])
    target = rng.randint(min_tokens, max_tokens) - sum(fact_lengths)
    chosen: list[str] = []
    used = 0
    start = rng.randrange(len(pool))
    i = start
    while used < target:  # consecutive sentences from a random start: reads like a document, wraps around
        if chosen and used + lengths[i] > target:
            break
        chosen.append(pool[i])
        used += lengths[i]
        i = (i + 1) % len(pool)
        if i == start:
            break
    for fact in facts:
        chosen.insert(rng.randint(0, len(chosen)), fact["statement"])
    context = " ".join(chosen)
    asked = facts[:]
    rng.shuffle(asked)
    if rng.random() >= ask_all_share and len(asked) > 1:
        asked = asked[: rng.randint(1, len(asked) - 1)]
    messages = [{"role": "user", "content": f"{context}\n\n{asked[0]['question']}"},
                {"role": "assistant", "content": asked[0]["answer"]}]
    for fact in asked[1:]:
        messages += [{"role": "user", "content": fact["question"]}, {"role": "assistant", "content": fact["answer"]}]
    return SyntheticSample(messages, facts, seed, used + sum(fact_lengths))


_LENGTH_CACHE: dict[tuple, list[int]] = {}


def _sentence_lengths(part: str, count_tokens) -> list[int]:
    key = (part, count_tokens)
    if key not in _LENGTH_CACHE:
        _LENGTH_CACHE[key] = list(count_tokens([" " + s for s in sentences(part)]))
    return _LENGTH_CACHE[key]


def make_samples(num_samples: int, count_tokens, seed_base: int = TRAIN_SEED_BASE, **options) -> list[SyntheticSample]:
    """Samples with seeds ``seed_base .. seed_base + num_samples - 1`` (``options``: see :func:`make_sample`)."""
    if seed_base < TRAIN_SEED_BASE and options.get("part", "train") == "train":
        raise ValueError(f"training seeds must be >= {TRAIN_SEED_BASE} (lower seeds belong to evaluation)")
    return [make_sample(seed_base + i, count_tokens, **options) for i in range(num_samples)]


def tokenizer_counter(tokenizer):
    """``list[str] -> list[int]`` token counts with a Hugging Face tokenizer (no special tokens)."""

    def count(texts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    return count


def char_estimate(texts: list[str]) -> list[int]:
    """Rough token counts without a tokenizer: one token per 4 characters."""
    return [max(1, len(t) // 4) for t in texts]


def write_jsonl(records, path: str | Path) -> Path:
    """Write records (dicts) as JSON lines, atomically (temp file + rename)."""
    from gatekv.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
