"""Scoring a generated answer against the expected strings (RULER's string match, made robust).

- ``contains``: 1.0 if the first expected answer occurs in the prediction, else 0.0;
- ``all``: the fraction of expected answers that occur (RULER's ``string_match_all``);
- ``exact``: 1.0 if the normalised prediction equals any normalised expected answer.

Matching is case-insensitive with whitespace collapsed; a numeric answer must not be part of a longer number
("4821" does not match "48213"), a word answer must not be part of a longer word ("cat" does not match "catalog").
"""

from __future__ import annotations

import re

__all__ = ["METRICS", "contains", "normalize", "score_answer"]

METRICS = ("contains", "all", "exact")


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, surrounding punctuation stripped."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".,;:!?\"'()[]")


def contains(prediction: str, answer: str) -> bool:
    """``answer`` occurs in ``prediction`` as a whole number / whole word(s) (case-insensitive)."""
    answer = normalize(answer)
    if not answer:
        raise ValueError("an expected answer must not be empty")
    text = re.sub(r"\s+", " ", prediction.lower())
    left = r"(?<![0-9])" if answer[0].isdigit() else (r"(?<![a-z0-9])" if answer[0].isalnum() else "")
    right = r"(?![0-9])" if answer[-1].isdigit() else (r"(?![a-z0-9])" if answer[-1].isalnum() else "")
    return re.search(left + re.escape(answer) + right, text) is not None


def score_answer(prediction: str, answers: list[str], metric: str) -> float:
    """Score in [0, 1] of ``prediction`` (see the module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {list(METRICS)}")
    if not answers:
        raise ValueError("answers must not be empty")
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    if metric == "contains":
        return float(contains(prediction, answers[0]))
    if metric == "all":
        return sum(contains(prediction, a) for a in answers) / len(answers)
    return float(any(normalize(prediction) == normalize(a) for a in answers))
