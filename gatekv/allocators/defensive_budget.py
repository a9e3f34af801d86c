"""Layer-DefensiveKV's budgets for any scorer: per-head counts from DefensiveKV's window attention allocated globally,
the tokens within each count chosen by the session's scorer (e.g. trained retaining heads)."""

from __future__ import annotations

import torch

from gatekv.allocators.adakv import adakv_counts, settle_counts
from gatekv.allocators.base import (
    AllocationInput,
    Allocator,
    KeepPlan,
    candidate_counts,
    check_unit_interval,
    ranking_scores,
    register_allocator,
    round_preserving_sum,
)
from gatekv.allocators.global_topk import GlobalAllocator, check_floor, plan_exact_counts
from gatekv.window_scores import check_pooling, defensive_scores


@register_allocator("defensive_budget")
class DefensiveBudgetAllocator(Allocator):
    """How many slots each (layer, KV head) keeps is what Layer-DefensiveKV keeps there: DefensiveKV's scores of the
    window attention (:func:`gatekv.window_scores.defensive_scores`, attention probabilities, comparable across
    layers) through the global allocator (top-k over every layer and head with a per-head ``floor``). Which slots fill
    each count is the top of the session's own scores (protected first).

    With ``scorer="defensivekv"`` (same pooling) this is Layer-DefensiveKV itself. Its use is a scorer whose ranking
    within a head is good but whose scores are not comparable across layers. The shipped retaining heads are one:
    on real text they rank better than DefensiveKV, and through the global allocator they do worse than through Ada-KV.

    The window attention comes from :meth:`observe_layer` (``needs_window_attention``), as for CAKE: every scoring
    step (prefill, each prefill chunk, each decode eviction) observes each layer before it is allocated. So the
    allocator cannot run on a shared prefill.

    ``guide_share = g > 0`` splits each layer's total differently among its heads: ``(1 - g)`` of it as above and
    ``g`` as Ada-KV splits it (safeguard ``guide_alpha``) on a count guide. The guide is the raw scores of the rank
    mix's ``guide`` member (e.g. the retaining heads, whose Ada-KV counts follow the tokens they are sure of, a needle
    among them), or the session's own scores. Each layer keeps Layer-DefensiveKV's total.

    floor:       per-head floor of the global allocator, a fraction of the per-head budget in [0, 1]
    kernel_size, pooling: DefensiveKV's 1-D pooling of the window attention
    guide_share: share in [0, 1] of each layer's total split by Ada-KV on the count guide (0: off)
    guide_alpha: Ada-KV's safeguard for that share, in [0, 1]
    """

    needs_window_attention = True

    def __init__(self, floor: float = 0.1, kernel_size: int = 5, pooling: str = "avg", guide_share: float = 0.0,
                 guide_alpha: float = 0.2):
        check_pooling(kernel_size, pooling, "defensive_budget")
        self._global = GlobalAllocator(check_floor(floor, "defensive_budget"))
        self.floor, self.kernel_size, self.pooling = self._global.floor, kernel_size, pooling
        self.guide_share = check_unit_interval(guide_share, "defensive_budget", "guide_share")
        self.guide_alpha = check_unit_interval(guide_alpha, "defensive_budget", "guide_alpha")
        self.needs_guide = self.guide_share > 0
        self._observed: dict[int, torch.Tensor] = {}
        self._count_guide: dict[int, torch.Tensor] = {}

    def observe_layer(self, layer_idx: int, attention: torch.Tensor, candidates: torch.Tensor) -> None:
        """attention: (B, H_q, w, T) window attention of layer ``layer_idx``; candidates: (B, H_kv, T) bool."""
        scores = defensive_scores(attention, candidates, self.kernel_size, self.pooling)
        self._observed[layer_idx] = scores.masked_fill(~candidates, float("-inf"))

    def observe_context(self, layer_idx: int, ctx) -> None:
        """The layer's DefensiveKV scores, shared with a DefensiveKV scorer of the same context (computed once)."""
        scores = ctx.defensive_scores(None, self.kernel_size, self.pooling)
        self._observed[layer_idx] = scores.masked_fill(~ctx.candidates, float("-inf"))

    def observe_guide(self, layer_idx: int, scores: torch.Tensor) -> None:
        """scores: (B, H_kv, T) count guide of layer ``layer_idx`` (``-inf`` on non-candidates)."""
        self._count_guide[layer_idx] = scores

    def reset(self) -> None:
        """Forget the observed layers."""
        self._observed.clear()
        self._count_guide.clear()

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        """Per layer (B, H_kv) kept counts: Layer-DefensiveKV's on the observed window attention."""
        guide = []
        for layer, scores in enumerate(inputs.scores):
            observed = self._observed.get(layer)
            if observed is None or observed.shape != scores.shape:
                got = None if observed is None else tuple(observed.shape)
                raise ValueError(f"defensive_budget: layer {layer} was not observed for these {tuple(scores.shape)} "
                                 f"scores (observed: {got}); the allocator needs each layer's window attention")
            guide.append(observed)
        counts = self._global.layer_counts(AllocationInput(guide, inputs.protected, inputs.budget, inputs.window))
        if self.guide_share == 0:
            return counts
        return [self._guided(layer, inputs, layer_counts) for layer, layer_counts in enumerate(counts)]

    def _guided(self, layer: int, inputs: AllocationInput, counts: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s (B, H) counts with ``guide_share`` of its total re-split by Ada-KV on the count guide."""
        scores, protected = inputs.scores[layer], inputs.protected[layer]
        count_guide = self._count_guide.get(layer)
        if count_guide is None or count_guide.shape != scores.shape:
            got = None if count_guide is None else tuple(count_guide.shape)
            raise ValueError(f"defensive_budget: layer {layer} has no count guide for these {tuple(scores.shape)} "
                             f"scores (got: {got}); guide_share needs one per scored layer")
        candidates = candidate_counts(scores)
        counts = torch.minimum(torch.maximum(counts, protected.sum(-1)), candidates)
        totals = counts.sum(-1)
        adakv = adakv_counts(count_guide, protected, totals, self.guide_alpha)
        mixed = (1.0 - self.guide_share) * counts.double() + self.guide_share * adakv.double()
        ranked = ranking_scores(scores, protected)
        out = torch.empty_like(counts)
        for b in range(counts.shape[0]):
            total = int(totals[b])
            row = round_preserving_sum(mixed[b], total)
            out[b] = settle_counts(row, protected[b].sum(-1), candidates[b], ranked[b], total)
        return out

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        return plan_exact_counts(inputs, self.layer_counts(inputs))
