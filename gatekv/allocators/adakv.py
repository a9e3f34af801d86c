"""Ada-KV: head-wise budgets inside a layer from the layer's flattened scores, with a safeguard."""

import torch

from gatekv.allocators.base import (
    AllocationInput,
    candidate_counts,
    check_unit_interval,
    Allocator,
    ranking_scores,
    register_allocator,
    round_preserving_sum,
)


@register_allocator("adakv")
class AdaKVAllocator(Allocator):
    """Per layer and row: take the top ``H * B`` slots over all heads' scores; ``c_h`` = picks of head h;
    head h keeps ``b_h = round((1 - alpha) * c_h + alpha * B)`` with ``sum_h b_h = H * B`` exactly.

    Each ``b_h`` stays between the head's protected and candidate counts; the rounding and these bounds are
    settled by giving/taking single slots by marginal score, so the layer total is preserved.
    alpha: safeguard in [0, 1] (0 = pure greedy, 1 = uniform).
    """

    def __init__(self, alpha: float = 0.2):
        self.alpha = check_unit_interval(alpha, "adakv", "alpha (safeguard)")

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        heads = inputs.scores[0].shape[1]
        totals = inputs.budget * heads
        return [adakv_counts(inputs.scores[l], inputs.protected[l], totals, self.alpha) for l in range(len(inputs.scores))]


def adakv_counts(scores: torch.Tensor, protected: torch.Tensor, totals: torch.Tensor, alpha: float) -> torch.Tensor:
    """Ada-KV's (B, H) counts of one layer: per row, the top ``totals[b]`` slots over all heads' ``scores`` (B, H, T)
    (protected first), ``b_h = round((1 - alpha) * picks_h + alpha * total / H)``, settled between each head's
    protected and candidate counts with the sum kept (at most the row's candidates)."""
    batch, heads, t = scores.shape
    ranked = ranking_scores(scores, protected)
    candidates = candidate_counts(scores)
    protected_counts = protected.sum(-1)
    counts = torch.zeros(batch, heads, dtype=torch.long, device=scores.device)
    for b in range(batch):
        total = min(int(totals[b]), int(candidates[b].sum()))
        if total == 0:
            continue
        picks = torch.topk(ranked[b].reshape(-1), total).indices // t
        greedy = torch.bincount(picks, minlength=heads).double()
        # alpha * B, with B = total / H (equal to the budget unless the row has fewer candidates than H * B)
        target = (1.0 - alpha) * greedy + alpha * total / heads
        row = round_preserving_sum(target, total)
        counts[b] = settle_counts(row, protected_counts[b], candidates[b], ranked[b], total)
    return counts


def settle_counts(counts, low, high, ranked, total):
    """Clamp counts (H,) into [low, high] and restore ``sum == total`` one slot at a time by marginal score."""
    counts = torch.minimum(torch.maximum(counts, low), high)
    ordered = torch.sort(ranked, dim=-1, descending=True).values  # (H, T)
    heads = counts.shape[0]
    index = torch.arange(heads)
    while int(counts.sum()) < total:
        room = counts < high
        gain = torch.where(room, ordered[index, counts.clamp(max=ordered.shape[1] - 1)], torch.full((heads,), float("-inf")))
        counts[int(torch.argmax(gain))] += 1
    while int(counts.sum()) > total:
        spare = counts > low
        loss = torch.where(spare, ordered[index, (counts - 1).clamp(min=0)], torch.full((heads,), float("inf")))
        counts[int(torch.argmin(loss))] -= 1
    return counts
