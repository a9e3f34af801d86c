"""RULER-style long-context tasks generated offline, deterministic per seed.

Each task fills a context to a target length (in tokens of the model's tokenizer) with haystack sentences and
embeds what the question needs::

    source = Haystack.default()                    # held-out pydoc_data.topics sentences (see below)
    sample = make_task_sample("niah_multikey", tokenizer, length=2048, seed=7, haystack=source)
    sample.context, sample.question, sample.answers, sample.metric

Tasks (``TASKS``):

- ``niah_single``: one numeric needle ("The secret access code for the vault is 48213."), asked for.
- ``niah_multikey``: four needles of the same form with different keys; one is asked for (the others distract).
- ``niah_multivalue``: one key holds four values, stated in four places; all four are asked for.
- ``niah_multiquery``: four needles; two are asked for in one question.
- ``vt`` (variable tracking): ``VAR QXK = 61734`` then a chain of ``VAR BNT = VAR QXK`` assignments scattered in
  the text; the question asks for every variable that ends up holding the value.
- ``cwe`` (common-word extraction): a numbered list of words where three words occur far more often than the
  others; the question asks for the three most common words (the haystack is the list itself).
- ``qa``: facts about people (city, employer, pet, instrument) scattered in the text, with distractor facts about
  other people; one fact is asked for.

Held-out by construction (the training recipe's ``gatekv.training.synthetic`` uses the complement): the haystack is
``synthetic.sentences("eval")`` (the last 30% of the sorted topics; no sentence shared with training), seeds stay
below ``synthetic.TRAIN_SEED_BASE``, and subjects/phrasings here do not occur in the training templates. Any local
text files can replace the haystack (:meth:`Haystack.from_files`).
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["TASKS", "EvalSample", "Haystack", "make_task_sample", "make_task_samples"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "qa")
"""Task names, in table order."""

_SUBJECTS = ("the archive", "the vault", "the server room", "the observatory", "the boathouse", "the lighthouse",
             "the pharmacy cabinet", "the radio tower", "the museum annex", "the bakery safe", "the print shop",
             "the ski locker", "the clock tower", "the bell tower", "the old mill", "the embassy gate")
_NAMES = ("Alba", "Bastian", "Cosima", "Dario", "Elif", "Fabio", "Greta", "Hugo", "Ines", "Jonas", "Kaia", "Luca",
          "Maren", "Nils", "Olga", "Pavel", "Rhea", "Soren", "Tilda", "Ugo", "Vera", "Wim", "Xenia", "Yusuf")
_CITIES = ("Lisbon", "Oslo", "Lima", "Perth", "Nairobi", "Seville", "Osaka", "Riga", "Tunis", "Zagreb", "Leon",
           "Bruges", "Gdansk", "Malaga", "Turku")
_EMPLOYERS = ("a shipyard", "a bakery", "the city library", "a weather station", "a bicycle workshop", "a vineyard",
              "a theatre", "a glass factory", "a flower market", "a recording studio")
_PETS = ("a parrot", "a tortoise", "a ferret", "a goldfish", "a rabbit", "a hedgehog", "a cockatoo", "a lizard")
_INSTRUMENTS = ("the cello", "the oboe", "the accordion", "the banjo", "the harp", "the trombone", "the sitar")
_WORDS = ("anchor", "blossom", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island", "jasmine",
          "kettle", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "riddle", "saddle", "thistle",
          "umbrella", "velvet", "walnut", "yonder", "zephyr", "almond", "basket", "candle", "dagger", "easel",
          "fennel", "goblet", "hammock", "igloo", "jigsaw", "kayak", "ladder", "mitten", "napkin", "oyster",
          "parcel", "quiver", "ribbon", "shovel", "teapot", "urchin", "violin", "wagon", "yogurt", "zipper")


@dataclass
class EvalSample:
    """One evaluation sample: what goes into the prompt and what counts as correct."""

    task: str
    seed: int
    context: str
    """The long context (compressed query-agnostically before the question is seen)."""
    question: str
    answers: list[str]
    """Expected strings; the metric decides how they are matched."""
    metric: str = "contains"
    """``contains`` (the first answer appears), ``all`` (fraction of answers that appear), ``exact``."""
    context_tokens: int = 0
    """Tokens of the context as counted when building it."""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Haystack:
    """Filler sentences for the contexts (digit-free prose, 40-250 characters each)."""

    def __init__(self, sentences: list[str] | tuple[str, ...], name: str):
        sentences = [s for s in sentences if s.strip()]
        if len(sentences) < 20:
            raise ValueError(
                f"haystack {name!r} has {len(sentences)} usable sentences; at least 20 are needed "
                "(40-250 characters, no digits or code symbols)"
            )
        self.sentences = tuple(sentences)
        self.name = name

    @classmethod
    @functools.lru_cache(maxsize=1)
    def default(cls) -> "Haystack":
        """The held-out part of the interpreter's documentation (``synthetic.sentences("eval")``)."""
        from gatekv.training.synthetic import sentences

        return cls(sentences("eval"), "pydoc_data.topics[eval]")

    @classmethod
    def from_files(cls, paths: list[str | Path]) -> "Haystack":
        """Sentences of local text files (``ValueError`` naming a missing file or a too-short source)."""
        text = []
        for path in paths:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"haystack file not found: {path}")
            text.append(path.read_text(encoding="utf-8", errors="replace"))
        pieces = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", " ".join(text)))
        usable = [s for s in pieces if 40 <= len(s) <= 250 and s[0].isupper() and not re.search(r"[0-9]", s)]
        return cls(usable, ",".join(str(p) for p in paths))


class _Filler:
    """Token-counted sentence supply for one tokenizer (lengths cached per haystack)."""

    _lengths: dict[tuple[int, str], list[int]] = {}

    def __init__(self, tokenizer, haystack: Haystack):
        key = (id(tokenizer), haystack.name)
        if key not in self._lengths:
            ids = tokenizer([" " + s for s in haystack.sentences], add_special_tokens=False)["input_ids"]
            self._lengths[key] = [len(i) for i in ids]
        self.lengths = self._lengths[key]
        self.sentences = haystack.sentences
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fill(self, rng: random.Random, budget: int) -> list[str]:
        """Consecutive sentences from a random start (wrapping) totalling at most ``budget`` tokens."""
        chosen, used = [], 0
        start = i = rng.randrange(len(self.sentences))
        while True:
            if used + self.lengths[i] > budget:
                break
            chosen.append(self.sentences[i])
            used += self.lengths[i]
            i = (i + 1) % len(self.sentences)
            if i == start:
                start = i = rng.randrange(len(self.sentences))  # long contexts: another pass from elsewhere
        return chosen


def _number(rng: random.Random, used: set[str], digits: int = 5) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if value not in used:
            used.add(value)
            return value


def _insert(rng: random.Random, chosen: list[str], statements: list[str], spread: bool = True) -> list[str]:
    """Insert statements at random sentence boundaries (each in its own place)."""
    out = list(chosen)
    for statement in statements:
        out.insert(rng.randint(0, len(out)), statement)
    return out


def _niah(rng, filler, length, kind):
    used: set[str] = set()
    subjects = rng.sample(_SUBJECTS, 4)
    if kind == "niah_single":
        subject, value = subjects[0], _number(rng, used)
        statements = [f"The secret access code for {subject} is {value}."]
        return statements, f"What is the secret access code for {subject}?", [value], "contains"
    if kind == "niah_multikey":
        values = [_number(rng, used) for _ in subjects]
        statements = [f"The secret access code for {s} is {v}." for s, v in zip(subjects, values)]
        asked = rng.randrange(4)
        return statements, f"What is the secret access code for {subjects[asked]}?", [values[asked]], "contains"
    if kind == "niah_multivalue":
        subject = subjects[0]
        values = [_number(rng, used) for _ in range(4)]
        statements = [f"One of the secret access codes for {subject} is {v}." for v in values]
        return statements, f"What are all the secret access codes for {subject}?", values, "all"
    values = [_number(rng, used) for _ in subjects]
    statements = [f"The secret access code for {s} is {v}." for s, v in zip(subjects, values)]
    a, b = sorted(rng.sample(range(4), 2))
    question = f"What are the secret access codes for {subjects[a]} and for {subjects[b]}?"
    return statements, question, [values[a], values[b]], "all"


def _variable_tracking(rng, filler, length):
    letters = string.ascii_uppercase
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice(letters) for _ in range(3))
        if name not in names:
            names.append(name)
    value = _number(rng, set())
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
    question = f"Which variables are assigned the value {value}? List all of them."
    return statements, question, names, "all"


def _qa(rng, filler, length):
    people = rng.sample(_NAMES, 6)
    facts = []
    for person in people:
        kind = rng.choice(("city", "employer", "pet", "instrument"))
        if kind == "city":
            city = rng.choice(_CITIES)
            facts.append((f"{person} grew up by the sea and now lives in {city}.", f"In which city does {person} live?", city))
        elif kind == "employer":
            employer = rng.choice(_EMPLOYERS)
            facts.append((f"{person} has worked at {employer} for many years.", f"Where does {person} work?", employer.split(" ", 1)[1]))
        elif kind == "pet":
            pet = rng.choice(_PETS)
            facts.append((f"At home, {person} looks after {pet}.", f"What animal does {person} look after?", pet.split(" ", 1)[1]))
        else:
            instrument = rng.choice(_INSTRUMENTS)
            facts.append((f"In the evenings {person} practises {instrument}.", f"Which instrument does {person} play?", instrument.split(" ", 1)[1]))
    asked = rng.randrange(len(facts))
    return [f[0] for f in facts], facts[asked][1], [facts[asked][2]], "contains"


def _cwe(rng, filler, length, head_tokens: int):
    """A numbered word list: three common words, each ~10x more frequent than any other (RULER's cwe); the list is
    sized to the length by counting its tokens."""
    words = list(_WORDS)
    rng.shuffle(words)
    common, rare = words[:3], words[3:]
    room = length - head_tokens - 16
    items = max(20, room // 4)
    order_seed = rng.random()

    def build(items: int) -> str:
        n_common = min(30, max(4, items // 8))
        n_rare = max(1, min(3, n_common // 4))
        bag = [w for w in common for _ in range(n_common)]
        i = 0
        while len(bag) < items:
            bag += [rare[i % len(rare)]] * n_rare
            i += 1
        bag = bag[:items]
        random.Random(f"{order_seed}:{items}").shuffle(bag)
        return "Below is a numbered list of words. " + " ".join(f"{k + 1}. {w}" for k, w in enumerate(bag))

    context = build(items)
    for _ in range(8):  # shrink until it fits (token counts of numbered items are not linear)
        used = filler.count(context)
        if used <= room or items <= 20:
            break
        items = max(20, int(items * room / used) - 1)
        context = build(items)
    if filler.count(context) > room:
        raise ValueError(f"length {length} is too short for task 'cwe'")
    question = "What are the three most common words in the list above? Answer with the three words."
    return context, question, common, "all"


def make_task_sample(task: str, tokenizer, length: int, seed: int, haystack: Haystack | None = None,
                     head_tokens: int = 0, split: str = "eval") -> EvalSample:
    """One sample of ``task`` whose context has at most ``length`` tokens (``head_tokens``: tokens the prompt
    template adds before the context, subtracted from the budget).

    split: ``eval`` (seeds below ``gatekv.training.synthetic.TRAIN_SEED_BASE``, default haystack: the held-out
    documentation) or ``train`` (fine-tuning data of the task: seeds from ``TRAIN_SEED_BASE`` up, default haystack:
    the training part of the documentation, which shares no sentence with the held-out one).
    """
    from gatekv.training.synthetic import TRAIN_SEED_BASE

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    if split == "eval" and not (isinstance(seed, int) and 0 <= seed < TRAIN_SEED_BASE):
        raise ValueError(f"seed must be an int in [0, {TRAIN_SEED_BASE}) (higher seeds belong to training), got {seed!r}")
    if split == "train" and not (isinstance(seed, int) and seed >= TRAIN_SEED_BASE):
        raise ValueError(f"training seeds must be ints >= {TRAIN_SEED_BASE} (lower seeds belong to evaluation), got {seed!r}")
    if not isinstance(length, int) or length < 128:
        raise ValueError(f"length must be an int >= 128 tokens, got {length!r}")
    if haystack is None:
        haystack = Haystack.default() if split == "eval" else _training_haystack()
    rng = random.Random(f"{task}:{seed}")  # one stream per (task, seed): tasks do not share draws
    filler = _Filler(tokenizer, haystack)
    if task == "cwe":
        context, question, answers, metric = _cwe(rng, filler, length, head_tokens)
    else:
        if task.startswith("niah"):
            statements, question, answers, metric = _niah(rng, filler, length, task)
        elif task == "vt":
            statements, question, answers, metric = _variable_tracking(rng, filler, length)
        else:
            statements, question, answers, metric = _qa(rng, filler, length)
        room = length - head_tokens - sum(filler.count(" " + s) for s in statements) - 8
        if room < 32:
            raise ValueError(f"length {length} is too short for task {task!r} (needs room for its facts)")
        chosen = filler.fill(rng, room)
        context = " ".join(_insert(rng, chosen, statements))
    return EvalSample(task, seed, context, question, list(answers), metric, filler.count(context),
                      {"haystack": haystack.name, **({"split": "train"} if split == "train" else {})})


@functools.lru_cache(maxsize=1)
def _training_haystack() -> Haystack:
    from gatekv.training.synthetic import sentences

    return Haystack(sentences("train"), "pydoc_data.topics[train]")


def make_task_samples(task: str, tokenizer, length: int, num_samples: int, seed_base: int = 0,
                      haystack: Haystack | None = None, head_tokens: int = 0, split: str = "eval") -> list[EvalSample]:
    """Samples with seeds ``seed_base .. seed_base + num_samples - 1`` (``split``: see :func:`make_task_sample`)."""
    return [make_task_sample(task, tokenizer, length, seed_base + i, haystack, head_tokens, split)
            for i in range(num_samples)]
