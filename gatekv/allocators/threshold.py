"""Threshold allocation: keep every token whose score exceeds ``tau`` (input-adaptive budget, KVzap / gates)."""

from __future__ import annotations

import math

import torch

from gatekv.allocators.base import AllocationInput, Allocator, KeepPlan, register_allocator
from gatekv.allocators.global_topk import plan_exact_counts

__all__ = ["ThresholdAllocator"]


@register_allocator("threshold")
class ThresholdAllocator(Allocator):
    """Head h keeps its protected slots (sinks, recent window) plus every other candidate with score ``> tau``.

    Meant for trained gates whose scores are keep-logits (``tau = 0`` is ``sigmoid > 0.5``). The kept amount
    follows the input, not the budget; with ``cap=True`` a head keeps at most ``max(B, protected)`` slots (its
    highest-scored ones above ``tau``).

    tau: finite threshold on the score, one for every layer, or a list of one per layer (per-layer calibration: a
         gate trained to rank, not to give keep-probabilities, has a score scale of its own in each layer);
    cap: bound each head by the budget.
    """

    def __init__(self, tau: float | list[float] = 0.0, cap: bool = False):
        values = tau if isinstance(tau, (list, tuple)) else [tau]
        if not values or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) for t in values):
            raise ValueError(f"threshold: tau must be a finite number or a non-empty list of them, got {tau!r}")
        if not isinstance(cap, bool):
            raise ValueError(f"threshold: cap must be a bool, got {cap!r}")
        self.tau = [float(t) for t in values] if isinstance(tau, (list, tuple)) else float(tau)
        self.cap = cap

    @property
    def uses_budget(self) -> bool:
        """Only when capped: otherwise the scores alone decide what is kept (any budget, 1.0 included)."""
        return self.cap

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        return plan_exact_counts(inputs, self.layer_counts(inputs))

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        """Per layer (B, H_kv): protected + unprotected candidates above ``tau`` (capped by the budget if asked)."""
        taus = self.tau if isinstance(self.tau, list) else [self.tau] * len(inputs.scores)
        if len(taus) != len(inputs.scores):
            raise ValueError(f"threshold: {len(taus)} per-layer taus for a model of {len(inputs.scores)} layers")
        counts = []
        for tau, scores, protected in zip(taus, inputs.scores, inputs.protected):
            above = ((scores > tau) & (scores > float("-inf")) & ~protected).sum(-1)
            layer = protected.sum(-1) + above
            if self.cap:
                layer = torch.minimum(layer, inputs.budget.to(layer.device)[:, None])
            counts.append(layer)
        return counts
