"""Offline identification of retrieval heads (RazorAttention) and semantic retrieval heads (CompressKV).

Both are scored on synthetic token sequences, so no dataset is needed:

- **retrieval** (RazorAttention): ``[bos] r r`` with r random tokens. A query at token r_t of the second copy
  attends to the first copy: the *echo* score is its attention on the earlier occurrence of r_t, the *induction*
  score its attention on the token after it (r_{t+1}, the one to copy next). retrieval = echo + induction.
- **semantic** (CompressKV): ``[bos] filler key answer filler key answer``. While the model reads the second
  ``answer`` (teacher forcing; the last key token predicts the first answer token) the *semantic* score is the
  attention mass landing anywhere on the first answer span: heads that look at the answer-bearing span, not only
  at the exact copied token.

Scores are averaged over samples and queries: ``(num_layers, H_q)``. The result is saved as JSON together with
the model's :class:`~gatekv.models.ModelFingerprint`. CLI: ``gatekv retrieval-heads`` (``gatekv.cli``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import dataclass, field

import torch

from gatekv.models import ModelFingerprint

__all__ = ["KINDS", "RetrievalHeads", "identify_retrieval_heads"]

KINDS = ("semantic", "retrieval")


@dataclass
class RetrievalHeads:
    """Per-head retrieval scores of one model and the heads selected from them."""

    fingerprint: ModelFingerprint
    """Shapes of the model the heads were identified on."""
    echo: list[list[float]]
    """(num_layers, H_q) attention on the earlier occurrence of the current token (repeated random sequences)."""
    induction: list[list[float]]
    """(num_layers, H_q) attention on the token after the earlier occurrence (repeated random sequences)."""
    semantic: list[list[float]]
    """(num_layers, H_q) attention mass on the answer-bearing span while the answer is produced."""
    kind: str = "semantic"
    """Which score selects the heads: ``semantic`` (CompressKV) or ``retrieval`` (echo + induction, RazorAttention)."""
    heads_per_layer: int = 1
    """Heads selected in every layer (top scores of ``kind``)."""
    settings: dict = field(default_factory=dict)
    """How the scores were measured (samples, lengths, seed)."""

    def __post_init__(self):
        if isinstance(self.fingerprint, dict):
            self.fingerprint = ModelFingerprint(**self.fingerprint)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        shape = (self.fingerprint.num_layers, self.fingerprint.num_q_heads)
        for name in ("echo", "induction", "semantic"):
            rows = getattr(self, name)
            if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
                raise ValueError(f"{name} must be a (num_layers, num_q_heads) = {shape} table")
        if isinstance(self.heads_per_layer, bool) or not isinstance(self.heads_per_layer, int) or not 1 <= self.heads_per_layer <= shape[1]:
            raise ValueError(f"heads_per_layer must be an int in [1, {shape[1]}], got {self.heads_per_layer!r}")

    def scores(self, kind: str | None = None) -> torch.Tensor:
        """(num_layers, H_q) float32 scores of ``kind`` (default: this result's kind)."""
        kind = kind or self.kind
        if kind == "semantic":
            return torch.tensor(self.semantic)
        if kind == "retrieval":
            return torch.tensor(self.echo) + torch.tensor(self.induction)
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")

    def heads(self, kind: str | None = None, heads_per_layer: int | None = None) -> list[list[int]]:
        """Per layer, the selected query-head indices (sorted), top ``heads_per_layer`` by score."""
        k = heads_per_layer or self.heads_per_layer
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.fingerprint.num_q_heads:
            raise ValueError(f"heads_per_layer must be an int in [1, {self.fingerprint.num_q_heads}], got {k!r}")
        top = self.scores(kind).topk(k, dim=-1).indices.sort(dim=-1).values
        return top.tolist()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fingerprint"] = dataclasses.asdict(self.fingerprint)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RetrievalHeads":
        """Forgiving for saved artifacts: unknown keys are ignored with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"retrieval heads file: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path) -> None:
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=1)

    @classmethod
    def load(cls, path) -> "RetrievalHeads":
        with open(path) as handle:
            return cls.from_dict(json.load(handle))

    def check_model(self, model) -> None:
        """ValueError naming every differing field if ``model`` is not the model these heads were found on."""
        self.fingerprint.check_matches(ModelFingerprint.from_model(model), what="retrieval heads file")


def _token_pool(model, tokenizer) -> torch.Tensor:
    """Ids usable as random content: the vocabulary minus special tokens."""
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set()
    if tokenizer is not None:
        if 2 * len(tokenizer) < vocab:  # e.g. a placeholder tokenizer from a folder without tokenizer files
            warnings.warn(f"tokenizer has {len(tokenizer)} tokens for {vocab} embeddings: ignoring it", stacklevel=3)
        else:
            special |= set(getattr(tokenizer, "all_special_ids", []) or [])
            vocab = min(vocab, len(tokenizer))  # embedding rows past the tokenizer are untrained padding
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(model.config, name, None)
        special |= set(value if isinstance(value, (list, tuple)) else [value]) - {None}
    pool = torch.tensor([i for i in range(vocab) if i not in special])
    if pool.numel() < 4:
        raise ValueError(f"vocabulary too small for synthetic sequences ({pool.numel()} usable ids)")
    return pool


def _bos(model, tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(model.config, "bos_token_id", None)
    vocab = model.get_input_embeddings().weight.shape[0]
    return [bos] if isinstance(bos, int) and 0 <= bos < vocab else []


@contextlib.contextmanager
def _eager(model):
    """Eager attention (it returns attention weights); the previous implementation is restored."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


def _attentions(model, ids: torch.Tensor) -> torch.Tensor:
    """(num_layers, B, H_q, T, T) float32 attention weights of a plain forward."""
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    return torch.stack([a.float() for a in out.attentions])


@torch.no_grad()
def identify_retrieval_heads(
    model,
    tokenizer=None,
    *,
    samples: int = 4,
    length: int = 64,
    answer_length: int = 8,
    heads_per_layer: int | None = None,
    fraction: float = 0.15,
    kind: str = "semantic",
    seed: int = 0,
) -> RetrievalHeads:
    """Score every attention head of ``model`` on synthetic inputs (see the module docstring).

    tokenizer:       optional; only used to avoid special tokens and to find BOS (None: the model config's ids)
    samples:         random sequences per test; length: random tokens per copy (retrieval) / filler length (semantic)
    answer_length:   tokens of the key and of the answer span (semantic test)
    heads_per_layer: heads selected per layer; None = max(1, round(fraction * H_q))
    kind:            which score selects heads: ``semantic`` (CompressKV) or ``retrieval`` (RazorAttention)
    Returns a :class:`RetrievalHeads` with (num_layers, H_q) tables.
    """
    for name, value, low in (("samples", samples, 1), ("length", length, 2), ("answer_length", answer_length, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    fingerprint = ModelFingerprint.from_model(model)
    if heads_per_layer is None:
        heads_per_layer = max(1, round(fraction * fingerprint.num_q_heads))
    device = model.get_input_embeddings().weight.device
    pool = _token_pool(model, tokenizer)
    bos = _bos(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)

    def draw(n):
        return pool[torch.randint(len(pool), (samples, n), generator=generator)]

    prefix = torch.tensor(bos, dtype=torch.long).expand(samples, len(bos))
    was_training = model.training
    model.eval()
    with _eager(model):
        # RazorAttention: [bos] r r ; query r_t in the second copy -> echo target r_t, induction target r_{t+1}
        r = draw(length)
        ids = torch.cat([prefix, r, r], 1).to(device)
        attn = _attentions(model, ids)  # (L, S, H, T, T)
        start = len(bos)
        t = torch.arange(length - 1)
        queries = start + length + t
        echo = attn[:, :, :, queries, start + t].mean(dim=(1, 3))
        induction = attn[:, :, :, queries, start + t + 1].mean(dim=(1, 3))
        # CompressKV: [bos] filler key answer filler key answer ; mass on the first answer span
        filler_a, filler_b, key, answer = draw(length), draw(length), draw(answer_length), draw(answer_length)
        ids = torch.cat([prefix, filler_a, key, answer, filler_b, key, answer], 1).to(device)
        attn = _attentions(model, ids)
        span0 = start + length + answer_length
        span = torch.arange(span0, span0 + answer_length)
        second_answer = span0 + answer_length + length + answer_length
        readers = torch.arange(second_answer - 1, second_answer + answer_length - 1)  # last key token + answer
        semantic = attn[:, :, :, readers][..., span].sum(-1).mean(dim=(1, 3))
    if was_training:
        model.train()
    return RetrievalHeads(
        fingerprint=fingerprint,
        echo=echo.tolist(),
        induction=induction.tolist(),
        semantic=semantic.tolist(),
        kind=kind,
        heads_per_layer=heads_per_layer,
        settings={"samples": samples, "length": length, "answer_length": answer_length, "seed": seed},
    )
