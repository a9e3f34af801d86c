"""Real-text tasks: how much a compressed cache disturbs the model on real documents (scored by NLL and KL, lower is
better), next to the accuracy tasks of :mod:`gatekv.eval.tasks`.

Samples are token windows of real documents (:func:`gatekv.corpus.load_corpus`; evaluation configs name the
held-out ``gnu-info`` corpus, training uses ``python-docs``)::

    documents = load_corpus("gnu-info")
    samples = make_realtext_samples("recall", tokenizer, documents, length=2048, num_samples=8)
    sample.prefix_ids("query_agnostic"), sample.rest_ids("query_agnostic"), sample.target_ids

Tasks (``REALTEXT_TASKS``), both on plain text (no chat template):

- ``lm``: the context is ``length`` tokens of a document, the target the next ``continuation_tokens`` tokens of the
  same document. Metrics: mean NLL per target token under the compressed cache, its difference to the full cache's
  on the same sample (``delta_nll``) and KL(full || compressed) per token against the full cache's distribution
  (teacher-forced). The task has no query: its observation window is the context's own last ``window`` tokens in
  both modes, so ``query_aware`` is the same computation as ``query_agnostic`` (the runner computes it once).
- ``recall``: the same context, then :data:`RECALL_INSTRUCTION` followed by the first ``recall_cue`` tokens of a
  verbatim earlier span of the context (a cue), and the span's next ``recall_span`` tokens are the target. The span
  lies in the first ``recall_region`` of the context and outside the recent window. Metrics: NLL / Δ NLL / KL on the
  span, ``copy`` (fraction of the span greedily reproduced before the first mistake), ``exact`` (1 if the whole
  span is) and ``top1`` (teacher-forced: fraction of span tokens that are the argmax; a small model's copies break
  early, so this separates settings where ``copy`` is near 0 for all). Query-agnostic: the context is compressed before the instruction is seen; query-aware: the instruction
  and the cue are the end of the compressed prompt (its observation window).

The greedy metrics come from the teacher-forced logits: greedy decoding reproduces the span up to its first
mistake exactly when the teacher-forced argmax does (until then both see the same tokens), so no generation runs.

Windows: every document is cut into non-overlapping windows of ``length + continuation_tokens`` tokens (the recall
task uses the same windows' first ``length`` tokens, so both tasks see the same context for a seed). The windows are
ordered round-robin over the documents (a shuffled document order per round, each document's windows shuffled), and
seed ``s`` takes window ``s mod #windows``: seeds below the number of documents use different documents, every seed
below the number of windows a different window, and a sample does not depend on how many are drawn.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch

from gatekv.settings import DEFAULT_WINDOW

__all__ = ["REALTEXT_METRICS", "REALTEXT_TASKS", "RECALL_INSTRUCTION", "RealTextSample", "full_logprobs",
           "make_realtext_samples", "score_target", "target_logits"]

REALTEXT_TASKS = ("lm", "recall")
"""Real-text task names, in table order."""

RECALL_INSTRUCTION = "\n\nRepeat the following passage from the document above word for word:"
"""Text between the context and the cue of the ``recall`` task (the cue's first token carries its own space)."""

REALTEXT_METRICS = {
    "lm": ("nll", "delta_nll", "kl"),
    "recall": ("nll", "delta_nll", "kl", "copy", "exact", "top1"),
}
"""Per task, the metrics a cell reports (means over its samples)."""


@dataclass
class RealTextSample:
    """One real-text sample (token ids as lists; a batch of one)."""

    task: str
    seed: int
    document: str
    """``Document.name`` of the window's document."""
    offset: int
    """Token index in the document where the window starts."""
    context_ids: list[int]
    """(L,) the compressed context: the tokenizer's leading special tokens (if any) + document tokens."""
    question_ids: list[int]
    """(T_q,) what follows the context before the target: empty for ``lm``; instruction + cue for ``recall``."""
    target_ids: list[int]
    """(T,) the scored tokens: the continuation (``lm``) or the span after the cue (``recall``)."""
    meta: dict = field(default_factory=dict)
    """``recall``: ``span_start`` (index in ``context_ids`` of the cue), ``cue_tokens``."""

    def prefix_ids(self, mode: str) -> list[int]:
        """The prompt that is compressed: the context (query-agnostic, and ``lm`` in both modes) or the context with
        the instruction and cue (``recall`` query-aware)."""
        if mode == "query_aware" and self.task != "lm":
            return self.context_ids + self.question_ids
        return list(self.context_ids)

    def rest_ids(self, mode: str) -> list[int]:
        """What is fed after the compressed prefix, teacher-forced: ``prefix + rest`` = context + question + target."""
        return (self.context_ids + self.question_ids + self.target_ids)[len(self.prefix_ids(mode)):]

    def to_dict(self) -> dict:
        return asdict(self)


def _special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before any text by default (a BOS), or []."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(ids) > len(plain) and ids[len(ids) - len(plain):] == plain:
        return ids[: len(ids) - len(plain)]
    return []


_TOKENIZED: dict[tuple, list[list[int]]] = {}


def _tokenized(tokenizer, documents) -> list[list[int]]:
    """Token ids of every document (cached per tokenizer and document set: one pass over a corpus per run)."""
    key = (id(tokenizer), tuple((d.name, len(d.text), hash(d.text)) for d in documents))
    if key not in _TOKENIZED:
        _TOKENIZED.clear()  # one corpus at a time: they are large
        _TOKENIZED[key] = tokenizer([d.text for d in documents], add_special_tokens=False, verbose=False)["input_ids"]
    return _TOKENIZED[key]


def _window_order(documents, counts: list[int]) -> list[tuple[int, int]]:
    """(document index, window index) pairs, round-robin over documents (see the module docstring)."""
    per_document = []
    for document, count in zip(documents, counts):
        windows = list(range(count))
        random.Random(f"windows:{document.name}:{count}").shuffle(windows)
        per_document.append(windows)
    order = []
    for round_ in range(max(counts, default=0)):
        present = [i for i, windows in enumerate(per_document) if len(windows) > round_]
        random.Random(f"round:{round_}").shuffle(present)
        order += [(i, per_document[i][round_]) for i in present]
    return order


def make_realtext_samples(task: str, tokenizer, documents, length: int, num_samples: int, seed_base: int = 0,
                          continuation_tokens: int = 128, recall_span: int = 96, recall_cue: int = 8,
                          recall_region: float = 0.8, window: int = DEFAULT_WINDOW) -> list[RealTextSample]:
    """Samples with seeds ``seed_base .. seed_base + num_samples - 1`` of ``task`` from ``documents``
    (``gatekv.corpus.Document``); ``length``: context tokens; ``window``: the recent window the recall span must
    stay out of. ``ValueError`` when the documents have fewer windows than samples or the span does not fit."""
    if task not in REALTEXT_TASKS:
        raise ValueError(f"unknown real-text task {task!r}; valid: {list(REALTEXT_TASKS)}")
    if not documents:
        raise ValueError("documents must not be empty")
    for name, value in (("length", length), ("continuation_tokens", continuation_tokens), ("recall_span", recall_span),
                        ("recall_cue", recall_cue), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    special = _special_prefix(tokenizer)
    body = length - len(special)
    size = body + continuation_tokens
    tokens = _tokenized(tokenizer, documents)
    order = _window_order(documents, [len(ids) // size for ids in tokens])
    if len(order) < num_samples:
        raise ValueError(f"the corpus has {len(order)} windows of {size} tokens ({len(documents)} documents), fewer than "
                         f"num_samples={num_samples}: use shorter lengths, fewer samples or more documents")
    region_end = min(int(recall_region * length), length - window)
    if task == "recall" and region_end - len(special) < recall_cue + recall_span:
        raise ValueError(f"recall: the span ({recall_cue} cue + {recall_span} tokens) does not fit in the first "
                         f"{region_end} tokens of a {length}-token context outside the {window}-token recent window")
    instruction = tokenizer(RECALL_INSTRUCTION, add_special_tokens=False)["input_ids"]
    samples = []
    for seed in range(seed_base, seed_base + num_samples):
        doc, index = order[seed % len(order)]
        offset = index * size
        window_ids = tokens[doc][offset: offset + size]
        context = special + window_ids[:body]
        if task == "lm":
            samples.append(RealTextSample(task, seed, documents[doc].name, offset, context, [], window_ids[body:]))
            continue
        last = region_end - recall_cue - recall_span  # the cue's latest start
        starts = list(range(len(special), last + 1))
        # prefer a cue that starts a word, so that it reads like the start of a passage
        word_starts = [s for s in starts if tokenizer.decode([context[s]])[:1].isspace()]
        start = random.Random(f"recall:{seed}").choice(word_starts or starts)
        cue = context[start: start + recall_cue]
        span = context[start + recall_cue: start + recall_cue + recall_span]
        samples.append(RealTextSample(task, seed, documents[doc].name, offset, context, instruction + cue, span,
                                      {"span_start": start, "cue_tokens": recall_cue}))
    return samples


# -- scoring --------------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def full_logprobs(model, sample: RealTextSample) -> torch.Tensor:
    """(T, vocab) float64 log-probabilities of the full (uncompressed) model at the positions predicting
    ``sample.target_ids``: one forward of context + question + target[:-1]."""
    ids = sample.context_ids + sample.question_ids + sample.target_ids[:-1]
    input_ids = torch.tensor([ids], dtype=torch.long, device=_device(model))
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=len(sample.target_ids)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def target_logits(model, cache, cache_kwarg: str, last_logits: torch.Tensor, rest: list[int],
                  target_len: int) -> torch.Tensor:
    """(T, vocab) logits predicting the last ``target_len`` tokens of ``rest``, teacher-forced on ``cache``, which holds
    the (compressed) prefix; ``last_logits``: (vocab,) the prefill's last position's logits (they predict
    ``rest[0]``). Call inside the compression session that owns ``cache``."""
    fed = rest[:-1]
    pieces = []
    if target_len > len(fed):
        pieces.append(last_logits.reshape(1, -1))
    if fed:
        input_ids = torch.tensor([fed], dtype=torch.long, device=_device(model))
        keep = min(target_len, len(fed))
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=keep, **{cache_kwarg: cache})
        pieces.append(out.logits[0])
    return torch.cat(pieces)[-target_len:]


def score_target(logits: torch.Tensor, target: list[int], full: torch.Tensor, task: str) -> dict:
    """Per-sample metrics of ``logits`` (T, vocab) predicting ``target`` (T,) against the full cache's log-probabilities
    ``full`` (T, vocab): ``nll`` and ``full_nll`` (mean per token, nats), ``delta_nll``, ``kl`` (mean per token of
    KL(full || this), each position's value clamped at 0 against rounding) and, for ``recall``, ``copy`` / ``exact`` /
    ``top1`` (fraction of span tokens that are the argmax given the true span before them)."""
    target_t = torch.tensor(target, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    full = full.to(logprobs.device)
    nll = float(-logprobs.gather(1, target_t[:, None]).mean())
    full_nll = float(-full.gather(1, target_t[:, None]).mean())
    kl = float((full.exp() * (full - logprobs)).sum(-1).clamp(min=0).mean())
    record = {"nll": nll, "full_nll": full_nll, "delta_nll": nll - full_nll, "kl": kl}
    if task == "recall":
        right = (logits.argmax(-1) == target_t).tolist()
        first_wrong = right.index(False) if False in right else len(right)
        record.update(copy=first_wrong / len(right), exact=float(first_wrong == len(right)),
                      top1=sum(right) / len(right))
    return record
