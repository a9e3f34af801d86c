"""Layer-DefensiveKV's budgets for any scorer: per-head counts from DefensiveKV's window attention allocated globally,
the tokens within each count chosen by the session's scorer (e.g. trained retaining heads)."""

from __future__ import annotations

import torch

from gatekv.allocators.base import AllocationInput, Allocator, KeepPlan, register_allocator
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

    floor:       per-head floor of the global allocator, a fraction of the per-head budget in [0, 1]
    kernel_size, pooling: DefensiveKV's 1-D pooling of the window attention
    """

    needs_window_attention = True

    def __init__(self, floor: float = 0.1, kernel_size: int = 5, pooling: str = "avg"):
        check_pooling(kernel_size, pooling, "defensive_budget")
        self._global = GlobalAllocator(check_floor(floor, "defensive_budget"))
        self.floor, self.kernel_size, self.pooling = self._global.floor, kernel_size, pooling
        self._guide: dict[int, torch.Tensor] = {}

    def observe_layer(self, layer_idx: int, attention: torch.Tensor, candidates: torch.Tensor) -> None:
        """attention: (B, H_q, w, T) window attention of layer ``layer_idx``; candidates: (B, H_kv, T) bool."""
        scores = defensive_scores(attention, candidates, self.kernel_size, self.pooling)
        self._guide[layer_idx] = scores.masked_fill(~candidates, float("-inf"))

    def reset(self) -> None:
        """Forget the observed layers."""
        self._guide.clear()

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        """Per layer (B, H_kv) kept counts: Layer-DefensiveKV's on the observed window attention."""
        guide = []
        for layer, scores in enumerate(inputs.scores):
            observed = self._guide.get(layer)
            if observed is None or observed.shape != scores.shape:
                got = None if observed is None else tuple(observed.shape)
                raise ValueError(f"defensive_budget: layer {layer} was not observed for these {tuple(scores.shape)} "
                                 f"scores (observed: {got}); the allocator needs each layer's window attention")
            guide.append(observed)
        return self._global.layer_counts(AllocationInput(guide, inputs.protected, inputs.budget, inputs.window))

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        return plan_exact_counts(inputs, self.layer_counts(inputs))
