"""D2O: evicted tokens merge into their most similar kept key when the similarity beats an EMA threshold."""

from __future__ import annotations

import torch

from gatekv.merge.base import (
    MergeContext,
    Merger,
    MergeSpec,
    check_unit_interval,
    most_similar_kept,
    register_merger,
    spec_from_targets,
)

__all__ = ["D2OMerger"]


@register_merger("d2o")
class D2OMerger(Merger):
    """Per layer and batch row, the threshold is an exponential moving average over evictions of the mean best
    similarity of the dropped tokens: ``tau <- beta * tau + (1 - beta) * mean_e sim_e`` (the first eviction sets
    ``tau``). A dropped token whose most cosine-similar kept key has ``sim >= tau`` merges into it with weight
    ``max(sim, 0)``; the others are discarded. Layer budgets from attention density: allocator ``d2o``.

    beta: EMA factor in [0, 1).
    """

    def __init__(self, beta: float = 0.9):
        self.beta = check_unit_interval("d2o", "beta", beta, 0.0, 1.0, open_high=True)
        self._threshold: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        """Forget the thresholds (a new prompt)."""
        self._threshold.clear()

    def merge(self, ctx: MergeContext) -> MergeSpec:
        similarity, slot = most_similar_kept(ctx.keys, ctx.kept_indices, ctx.kept_counts)
        dropped = ctx.dropped() & (similarity > float("-inf"))
        count = dropped.sum((1, 2))
        mean = torch.where(dropped, similarity, torch.zeros_like(similarity)).sum((1, 2)) / count.clamp(min=1)  # (B,)
        old = self._threshold.get(ctx.layer_idx)
        if old is None or old.shape != mean.shape:
            tau = mean
        else:
            tau = torch.where(count > 0, self.beta * old + (1.0 - self.beta) * mean, old)
        self._threshold[ctx.layer_idx] = tau
        merge = dropped & (similarity >= tau[:, None, None])
        target = torch.where(merge, slot, torch.full_like(slot, -1))
        return spec_from_targets(target, similarity.clamp(min=0), ctx)
