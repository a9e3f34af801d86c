"""Offline needle-in-a-haystack prompts: no download, deterministic per seed (and Python version).

The haystack is made of sentences from the held-out part of the interpreter's own documentation
(``pydoc_data.topics``, sentences without digits so the needle's number is the only one; training never sees them). One fact, e.g. "The secret access code for the archive is 48213.",
is inserted between two sentences at a chosen depth, and the question asks for it::

    prompt = needle_prompt(tokenizer, n_tokens=2048, seed=0)
    out = model.generate(prompt.prompt_ids, max_new_tokens=24)
    prompt.is_correct(tokenizer.decode(out[0, prompt.prompt_ids.shape[1]:]))

The chat template wraps ``context + "\\n\\n" + question`` as one user turn. The token ids are split at the end of
the haystack: ``context_ids`` (template head + haystack, the part to compress query-agnostically) and
``question_ids`` (the question, the end of the user turn and the assistant header); ``prompt_ids`` is exactly
their concatenation, so query-aware and query-agnostic runs see the same tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from gatekv.chat import chat_template_parts  # re-exported: its home was here

__all__ = ["NeedlePrompt", "chat_template_parts", "haystack_sentences", "needle_prompt"]

_SUBJECTS = ("the archive", "the vault", "the server room", "the observatory", "the greenhouse", "the boathouse")


@dataclass
class NeedlePrompt:
    """One needle-in-a-haystack sample (batch of one)."""

    context_ids: torch.Tensor
    """(1, T_c) int64: chat-template head + haystack with the needle (no question)."""
    question_ids: torch.Tensor
    """(1, T_q) int64: ``"\\n\\n" + question``, end of the user turn, assistant header."""
    prompt_ids: torch.Tensor
    """(1, T_c + T_q) int64: ``cat(context_ids, question_ids)``."""
    answer: str
    """The expected answer (the needle's number), e.g. ``"48213"``."""
    needle_span: tuple[int, int]
    """``[start, end)`` token indices of the needle sentence in ``context_ids`` (= its RoPE positions)."""
    needle: str
    """The inserted sentence."""
    question: str
    """The question text."""
    depth: float
    """Where the needle sits, as a fraction of the haystack's sentences (0 = start, 1 = end)."""

    def is_correct(self, generated: str) -> bool:
        """True if the generated text contains the expected answer."""
        return self.answer in generated


def haystack_sentences() -> tuple[str, ...]:
    """Prose sentences (40-250 characters, no digits, no code symbols) of the held-out evaluation part of
    ``pydoc_data.topics`` (``gatekv.training.synthetic.sentences("eval")``: training never sees them)."""
    from gatekv.training.synthetic import sentences

    return sentences("eval")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def needle_prompt(
    tokenizer,
    n_tokens: int,
    seed: int,
    depth: float | None = None,
    subject: str | None = None,
    digits: int = 5,
) -> NeedlePrompt:
    """A needle prompt whose context (template head + haystack + needle) has at most ``n_tokens`` tokens.

    tokenizer: a tokenizer with a chat template (SmolLM2's)
    n_tokens:  context length budget in tokens; the context is filled with whole sentences up to it
    seed:      selects the haystack order, the depth (if not given), the subject (if not given) and the number
    depth:     needle position as a fraction of the haystack's sentences, in [0, 1]; None = uniform at random
    subject:   what the code opens, e.g. ``"the archive"``; None = one of a few, at random
    digits:    length of the numeric answer
    """
    if not isinstance(n_tokens, int) or n_tokens < 64:
        raise ValueError(f"n_tokens must be an int >= 64, got {n_tokens!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not isinstance(digits, int) or not 1 <= digits <= 12:
        raise ValueError(f"digits must be an int in [1, 12], got {digits!r}")
    rng = random.Random(seed)
    # always draw all three, so that fixing one argument does not change the others
    drawn_depth, drawn_subject = rng.random(), rng.choice(_SUBJECTS)
    depth = drawn_depth if depth is None else depth
    subject = drawn_subject if subject is None else subject
    answer = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
    needle = f"The secret access code for {subject} is {answer}."
    question = f"What is the secret access code for {subject}?"

    head, tail = chat_template_parts(tokenizer)
    head_ids = _encode(tokenizer, head)
    needle_ids = _encode(tokenizer, " " + needle)
    question_ids = _encode(tokenizer, "\n\n" + question + tail)
    # 4 tokens of slack: re-encoding the first sentence without its leading space may change its length
    room = n_tokens - len(head_ids) - len(needle_ids) - 4
    if room < 0:
        raise ValueError(f"n_tokens={n_tokens} is too small for the template and the needle ({n_tokens - room})")

    pool = list(haystack_sentences())
    encoded = dict(zip(pool, tokenizer([" " + s for s in pool], add_special_tokens=False)["input_ids"]))
    chosen: list[str] = []
    used = 0
    while True:  # whole sentences, reshuffled passes over the pool for long contexts
        order = pool[:]
        rng.shuffle(order)
        fitted = False
        for sentence in order:
            if used + len(encoded[sentence]) > room:
                continue
            chosen.append(sentence)
            used += len(encoded[sentence])
            fitted = True
            if room - used < 8:
                break
        if not fitted or room - used < 8:
            break

    at = round(depth * len(chosen))
    pieces = [encoded[s] for s in chosen[:at]] + [needle_ids] + [encoded[s] for s in chosen[at:]]
    # the user turn starts right after the template head: no space before its first sentence
    first = needle if at == 0 else chosen[0]
    pieces[0] = _encode(tokenizer, first)
    start = len(head_ids) + sum(len(ids) for ids in pieces[:at])
    context = head_ids + [t for ids in pieces for t in ids]
    needle_len = len(pieces[at])
    context_ids = torch.tensor([context], dtype=torch.long)
    question_tensor = torch.tensor([question_ids], dtype=torch.long)
    return NeedlePrompt(
        context_ids=context_ids,
        question_ids=question_tensor,
        prompt_ids=torch.cat([context_ids, question_tensor], dim=1),
        answer=answer,
        needle_span=(start, start + needle_len),
        needle=needle,
        question=question,
        depth=depth,
    )
