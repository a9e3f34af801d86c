"""A training mix that teaches general importance, not only needle lookup (issue 14).

Three parts, one JSONL (``data.format: auto`` reads it as ``mixed``: chats and plain documents, decided per record):

- ``docs``: windows of real documents (:func:`gatekv.corpus.load_corpus`, the *training* corpus ``python-docs`` by
  default). Record ``{"text": context + continuation, "prompt_chars": len(context)}``: the context is the prompt to
  evict, the continuation (``continuation`` tokens) is the response, so the CIS label is the continuation's attention
  on the context — Locret's target on plain long text.
- ``qa``: the synthetic retrieval chats of :mod:`gatekv.training.synthetic` (1-4 facts, multi-turn questions).
- ``multi``: the same generator with many facts (``multi_facts``, default 4-8) at long contexts: multi-needle,
  every fact asked in its own turn.

Context lengths are drawn log-uniformly in ``[min_tokens, max_tokens]`` (long samples cost most: the first epoch runs
the frozen model on every token). Deterministic per seed; training seeds stay >= ``synthetic.TRAIN_SEED_BASE``.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from gatekv.training import synthetic

__all__ = ["MixConfig", "document_records", "make_mix"]


@dataclass
class MixConfig:
    """What :func:`make_mix` builds."""

    num_samples: int = 128
    """Total records."""
    shares: tuple[float, float, float] = (0.5, 0.35, 0.15)
    """Fractions of docs / qa / multi (normalised)."""
    min_tokens: int = 512
    """Shortest context in tokens."""
    max_tokens: int = 8192
    """Longest context in tokens (every part; ``part_max_tokens`` may lower it per part)."""
    part_max_tokens: tuple[int | None, int | None, int | None] = (None, 4096, None)
    """Longest context of docs / qa / multi (None = ``max_tokens``); multi contexts start at 2,048 tokens."""
    continuation: int = 256
    """docs: response tokens after the context."""
    multi_facts: tuple[int, int] = (4, 8)
    """multi: facts per sample."""
    corpus: str = "python-docs"
    """docs: the corpus (a training corpus; evaluation uses ``gnu-info``)."""
    seed: int = synthetic.TRAIN_SEED_BASE

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if len(self.shares) != 3 or any(s < 0 for s in self.shares) or sum(self.shares) <= 0:
            raise ValueError(f"shares must be three non-negative fractions (docs, qa, multi), got {self.shares}")
        if not 16 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 16 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if len(self.part_max_tokens) != 3 or any(m is not None and m < self.min_tokens for m in self.part_max_tokens):
            raise ValueError(f"part_max_tokens must be three lengths >= min_tokens (or None), got {self.part_max_tokens}")
        if self.continuation < 1:
            raise ValueError(f"continuation must be >= 1, got {self.continuation}")
        if not 1 <= self.multi_facts[0] <= self.multi_facts[1]:
            raise ValueError(f"multi_facts must be (low, high) with 1 <= low <= high, got {self.multi_facts}")
        if self.seed < synthetic.TRAIN_SEED_BASE:
            raise ValueError(f"seed must be >= {synthetic.TRAIN_SEED_BASE} (lower seeds belong to evaluation)")

    def counts(self) -> tuple[int, int, int]:
        """Records of docs / qa / multi (largest remainder, summing to ``num_samples``)."""
        total = sum(self.shares)
        raw = [self.num_samples * s / total for s in self.shares]
        counts = [int(r) for r in raw]
        for i in sorted(range(3), key=lambda i: raw[i] - counts[i], reverse=True)[: self.num_samples - sum(counts)]:
            counts[i] += 1
        return counts[0], counts[1], counts[2]

    def part_max(self, part: int) -> int:
        """Longest context of part 0 (docs), 1 (qa) or 2 (multi)."""
        limit = self.part_max_tokens[part]
        return self.max_tokens if limit is None else min(limit, self.max_tokens)


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def document_records(tokenizer, count: int, config: MixConfig) -> list[dict]:
    """``count`` document-continuation records, each from a different document where the corpus allows (then a
    non-overlapping window of a document already used). ``tokenizer``: a fast Hugging Face tokenizer (offsets)."""
    from gatekv.corpus import load_corpus

    rng = random.Random(config.seed)
    documents = load_corpus(config.corpus, min_chars=4 * (config.min_tokens + config.continuation))
    if not documents:
        raise ValueError(f"corpus {config.corpus!r} has no document of {config.min_tokens + config.continuation}+ tokens")
    order = list(range(len(documents)))
    rng.shuffle(order)
    encoded: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}
    used: dict[int, int] = {}  # document -> first token not yet used
    records: list[dict] = []
    attempts = 0
    while len(records) < count:
        if attempts > 20 * count + len(documents):
            raise ValueError(f"corpus {config.corpus!r}: only {len(records)} of {count} windows fit")
        attempts += 1
        index = order[(len(records) + attempts) % len(order)]
        if index not in encoded:
            enc = tokenizer(documents[index].text, add_special_tokens=False, return_offsets_mapping=True)
            encoded[index] = (enc["input_ids"], enc["offset_mapping"])
        ids, offsets = encoded[index]
        start = used.get(index, 0)
        available = len(ids) - start - config.continuation
        if available < config.min_tokens:
            continue
        length = min(_log_uniform(rng, config.min_tokens, config.part_max(0)), available)
        start += rng.randrange(0, max(1, min(available - length, 2048)) + 1) if available > length else 0
        end_prompt, end = start + length, start + length + config.continuation
        first, cut, last = offsets[start][0], offsets[end_prompt - 1][1], offsets[end - 1][1]
        used[index] = end
        records.append({"messages": None, "text": documents[index].text[first:last], "prompt_chars": cut - first,
                        "meta": {"part": "docs", "source": documents[index].name, "context_tokens": length,
                                 "seed": config.seed + len(records)}})
    return records


def make_mix(tokenizer, config: MixConfig) -> tuple[list[dict], dict]:
    """The records (shuffled, deterministic) and a summary of the mix (counts, lengths, corpus) for the card."""
    docs, qa, multi = config.counts()
    count_tokens = synthetic.tokenizer_counter(tokenizer)
    records = document_records(tokenizer, docs, config) if docs else []
    rng = random.Random(config.seed + 1)
    for i in range(qa):
        seed = config.seed + 100_000 + i
        length = _log_uniform(rng, config.min_tokens, config.part_max(1))
        sample = synthetic.make_sample(seed, count_tokens, min_tokens=length, max_tokens=length)
        records.append(_chat_record(sample, "qa"))
    for i in range(multi):
        seed = config.seed + 200_000 + i
        multi_max = config.part_max(2)
        length = _log_uniform(rng, min(max(config.min_tokens, 2048), multi_max), multi_max)
        sample = synthetic.make_sample(seed, count_tokens, min_tokens=length, max_tokens=length,
                                       num_facts=config.multi_facts, ask_all_share=1.0)
        records.append(_chat_record(sample, "multi"))
    random.Random(config.seed + 2).shuffle(records)
    summary = {"docs": docs, "qa": qa, "multi": multi, "corpus": config.corpus,
               "context_tokens": {name: [config.min_tokens, config.part_max(i)] for i, name in
                                  enumerate(("docs", "qa", "multi"))}, "continuation": config.continuation,
               "multi_facts": list(config.multi_facts), "seed": config.seed,
               "total_context_tokens": sum(r["meta"]["context_tokens"] for r in records), "config": asdict(config)}
    return records, summary


def _chat_record(sample: synthetic.SyntheticSample, part: str) -> dict:
    # the same columns as the document records (text = None): one JSONL, one schema
    return {"messages": sample.messages, "text": None, "prompt_chars": None,
            "meta": {"part": part, "source": "pydoc_data.topics (train split)", "context_tokens": sample.context_tokens,
                     "seed": sample.seed}}
