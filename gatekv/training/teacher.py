"""Teacher scores for the ``teacher`` target: what a registered scorer gives each prompt token inside ``compress``.

The scorer runs exactly as at inference (one-shot prefill of the prompt through :func:`gatekv.compress`, KVzip's
replay included), so the heads learn the scores the scorer would evict by (the KVzap recipe with ``kvzip``).
"""

from __future__ import annotations

import torch

from gatekv.scorers import LayerContext, Scorer, get_scorer
from gatekv.settings import DEFAULT_SINKS, DEFAULT_WINDOW

__all__ = ["build_teacher", "teacher_scores"]


def build_teacher(name: str, options: dict | None = None, tokenizer=None) -> Scorer:
    """The scorer ``name`` with ``options``; a scorer that takes a tokenizer (KVzip's repeat prompt) gets ``tokenizer``."""
    scorer = get_scorer(name, **(options or {}))
    if tokenizer is not None:
        scorer.bind_tokenizer(tokenizer)
    return scorer


class _Recorder(Scorer):
    """Delegates to ``inner`` and keeps each layer's last scores by token position (the last call decides, as in the
    session: the replay's, or the observers' when query-aware)."""

    def __init__(self, inner: Scorer):
        self.inner = inner
        self.needs = inner.needs
        self.state_names = inner.state_names
        self.replays = inner.replays
        self.last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def replay_inputs(self, token_ids, token_positions, start, end):
        return self.inner.replay_inputs(token_ids, token_positions, start, end)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        scores = self.inner.score(ctx)
        self.last[ctx.layer_idx] = (scores.detach().float(), torch.where(ctx.candidates, ctx.positions, -1))
        return scores


def teacher_scores(model, scorer: Scorer, prompt_ids: torch.Tensor, query_ids: torch.Tensor | None = None,
                   window: int = DEFAULT_WINDOW, sinks: int = DEFAULT_SINKS) -> torch.Tensor:
    """``(Ly, H_kv, P)`` float32 scores ``scorer`` gives the ``P`` tokens of one prompt.

    prompt_ids: (P,) token ids (no padding); query_ids: (R,) observer tokens for a query-aware scorer (the sample's
    response), None = query-agnostic; window/sinks: the session's (the observation window of SnapKV-style scorers).
    """
    num_layers = model.config.num_hidden_layers
    prompt_ids = prompt_ids.reshape(1, -1)
    length = prompt_ids.shape[1]
    recorder = _Recorder(scorer)
    from gatekv import compress
    from gatekv.models import cache_kwarg

    # decode_budget makes the session score even when the budget covers the prompt (no decode step follows)
    with torch.no_grad(), compress(model, recorder, "uniform", budget=1.0, window=window, sinks=sinks,
                                   decode_budget=length + window + sinks + 1,
                                   query=None if query_ids is None else query_ids.reshape(1, -1)) as session:
        model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): session.new_cache()})
    if len(recorder.last) != num_layers:
        raise RuntimeError(f"teacher {scorer!r} scored {len(recorder.last)} of {num_layers} layers")
    out = torch.full((num_layers, recorder.last[0][0].shape[1], length), float("nan"))
    for layer, (scores, positions) in recorder.last.items():
        real = positions[0] >= 0  # (H, T): prompt slots (position = token index: one row, no padding)
        head, slot = real.nonzero(as_tuple=True)
        out[layer, head, positions[0][head, slot].cpu()] = scores[0][head, slot].cpu()
    if torch.isnan(out).any():
        raise RuntimeError(f"teacher {scorer!r} left prompt tokens unscored")
    return out
