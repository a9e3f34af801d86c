"""One prefill scored by many scorers, a compacted fork of its cache per (scorer, allocator, budget) setting.

:func:`gatekv.compress.shared_prefill` opens the session and yields a :class:`SharedPrefill`, which uses the public
:class:`~gatekv.compress.CompressionSession` API only: the session holds the prefill's full cache
(``hold_prefills``, ``held_cache``) and compacts copies of it (``fork``). This module does not import
``gatekv.compress`` (which re-exports it).
"""

from __future__ import annotations

import torch

from gatekv.allocators import Allocator, get_allocator
from gatekv.attention import ScorerGroup
from gatekv.cache import CompressedCache
from gatekv.merge import Merger, get_merger
from gatekv.models import cache_kwarg
from gatekv.scorers import LayerContext, Scorer
from gatekv.settings import resolve_budget
from gatekv.stats import CompressionStats

__all__ = ["SharedPrefill"]


class _ScoreSet(ScorerGroup):
    """Several scorers over the same layer contexts (one shared prefill): each one's ``(B, H_kv, T)`` scores, ``-inf``
    on non-candidate slots as the session masks them, are kept per layer in ``results[name][layer]``; the first one's
    are returned."""

    def __init__(self, scorers: dict[str, Scorer]):
        replaying = [name for name, s in scorers.items() if s.replays]
        if len(replaying) > 1:
            raise ValueError(f"a shared prefill takes at most one replaying scorer (each replays its own inputs), got {replaying}")
        self._take_members(scorers)
        self.replays = bool(replaying)
        self._replaying = scorers[replaying[0]] if replaying else None
        self.results: dict[str, dict[int, torch.Tensor]] = {name: {} for name in scorers}

    def replay_inputs(self, token_ids, token_positions, start, end):
        return self._replaying.replay_inputs(token_ids, token_positions, start, end)

    def trim(self, layer_idx: int, width: int) -> None:
        """Drop slots past ``width`` from the stored scores of layer ``layer_idx`` (a replay's KV was dropped)."""
        for results in self.results.values():
            if layer_idx in results:
                results[layer_idx] = results[layer_idx][..., :width]

    def score(self, ctx: LayerContext) -> torch.Tensor:
        first = None
        for name, scorer in self.members.items():
            if ctx.replay is not None and not scorer.replays:
                continue  # a replay forward is scored by the replaying scorer only
            scores = scorer.score(ctx).float()
            if scores.shape != ctx.positions.shape:
                raise ValueError(f"scorer {name!r} returned shape {tuple(scores.shape)}, expected {tuple(ctx.positions.shape)}")
            self.results[name][ctx.layer_idx] = scores.masked_fill(~ctx.candidates, float("-inf"))
            first = scores if first is None else first
        return first


class SharedPrefill:
    """One prefill scored by several scorers; :meth:`fork` compacts a copy of its full cache per (scorer, allocator,
    budget). Every fork equals what :func:`compress` with that scorer, allocator and budget (one-shot prefill) builds
    for the same prompt, at the cost of one prefill for all of them. Made by :func:`gatekv.compress.shared_prefill`.

    session:   the :class:`~gatekv.compress.CompressionSession` (entered) whose scorer is ``score_set``
    score_set: the scorers scored together on the prefill
    """

    def __init__(self, session, score_set: _ScoreSet):
        self.session = session
        self._score_set = score_set

    @property
    def scorer_names(self) -> list[str]:
        return list(self._score_set.members)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``input_ids`` (B, T) once, scoring every layer with every scorer; returns the last
        position's logits (B, vocab). The full cache is kept until the next :meth:`prefill`."""
        session = self.session
        session.hold_prefills()
        for results in self._score_set.results.values():
            results.clear()
        model = session.model
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                       **{cache_kwarg(model): session.new_cache()})
        if session.held_cache is None:
            raise RuntimeError("shared prefill: the forward was not scored (no compressible prompt)")
        return output.logits[:, -1]

    def fork(self, scorer: str, allocator: str | Allocator = "uniform", budget=0.1,
             merge: str | Merger | None = None) -> tuple[CompressedCache, CompressionStats]:
        """A compacted copy of the prefilled cache: ``scorer``'s scores, ``allocator``, ``budget`` (ratio or count
        per head), optional ``merge``. Returns ``(cache, stats)``; continue generating on ``cache`` inside the
        :func:`~gatekv.compress.shared_prefill` block (pass the whole prompt, as after a query-agnostic prefill)."""
        session = self.session
        if session.held_cache is None:
            raise RuntimeError("fork() needs a prefill() first")
        if scorer not in self._score_set.results:
            raise ValueError(f"scorer {scorer!r} was not scored in this prefill; scored: {self.scorer_names}")
        allocator = get_allocator(allocator)
        if allocator.observes_prefill:
            raise ValueError(f"allocator {allocator!r} observes the prefill itself (cascade/window attention): "
                             "it cannot run on a shared prefill; use compress()")
        merger = None if merge is None else get_merger(merge)
        budget = resolve_budget(budget, "budget")
        scores = [self._score_set.results[scorer][l] for l in range(session.spec.num_layers)]
        return session.fork(scores, allocator, budget, merger)
