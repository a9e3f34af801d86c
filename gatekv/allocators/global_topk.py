"""Global allocation: top-k over every layer and KV head jointly, with a per-head floor (Layer-DefensiveKV)."""

from __future__ import annotations

import torch

from gatekv.allocators.base import (
    AllocationInput,
    Allocator,
    KeepPlan,
    candidate_counts,
    plan_from_counts,
    ranking_scores,
    register_allocator,
)

__all__ = ["GlobalAllocator", "plan_exact_counts"]


def plan_exact_counts(inputs: AllocationInput, counts: list[torch.Tensor]) -> KeepPlan:
    """A plan keeping exactly ``counts[l]`` (B, H_kv) slots per head, clamped between protected and candidates.

    Unlike :meth:`Allocator.allocate` there is no "budget covers every candidate, keep them all" rule: allocators
    that move budget between layers (global, CAKE) or keep an input-adaptive amount (threshold) need their totals
    kept as computed.
    """
    indices, kept = [], []
    for layer, layer_counts in enumerate(counts):
        candidates = candidate_counts(inputs.scores[layer])
        protected = inputs.protected[layer].sum(-1)
        layer_counts = torch.minimum(torch.maximum(layer_counts.to(candidates.device), protected), candidates)
        idx, c = plan_from_counts(inputs.scores[layer], inputs.protected[layer], layer_counts)
        indices.append(idx)
        kept.append(c)
    return KeepPlan(indices, kept)


def check_floor(floor, name: str) -> float:
    """The per-head floor of a global allocation, a fraction of the per-head budget in [0, 1]; the error names
    ``name``."""
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= floor <= 1.0:
        raise ValueError(f"{name}: floor must be a fraction of the per-head budget in [0, 1], got {floor!r}")
    return float(floor)


@register_allocator("global")
class GlobalAllocator(Allocator):
    """Per batch row: every head of every layer first keeps its top ``f_h = clamp(round(floor * B), prot_h, cand_h)``
    slots (protected first); the remaining ``N * H * B - sum f_h`` slots go to the highest scores over all layers
    and heads jointly. Total kept per row = ``N * H * B`` (sum of the per-layer budgets), or every candidate if
    fewer. Scores must be comparable across layers (e.g. DefensiveKV's normalised attention).

    floor: fraction of the per-head budget ``B`` every head is guaranteed, in [0, 1] (0 = pure global top-k,
           1 = uniform).
    """

    def __init__(self, floor: float = 0.1):
        self.floor = check_floor(floor, "global")

    def allocate(self, inputs: AllocationInput) -> KeepPlan:
        return plan_exact_counts(inputs, self.layer_counts(inputs))

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        """Per layer (B, H_kv) kept counts (see the class docstring)."""
        num_layers = len(inputs.scores)
        device = inputs.scores[0].device
        budget = inputs.budget.to(device)
        floors, sorted_rest = [], []
        for scores, protected in zip(inputs.scores, inputs.protected):
            candidates = candidate_counts(scores)  # (B, H)
            wanted = torch.round(budget.double() * self.floor).long()[:, None]
            floor = torch.minimum(torch.maximum(wanted, protected.sum(-1)), candidates)
            floors.append(floor)
            # each head's scores in descending order; the first floor_h are taken, the rest compete globally
            ordered = torch.sort(ranking_scores(scores, protected), dim=-1, descending=True).values
            rank = torch.arange(scores.shape[-1], device=device)
            sorted_rest.append(ordered.masked_fill(rank < floor[..., None], float("-inf")))
        counts = [f.clone() for f in floors]
        heads = inputs.scores[0].shape[1]
        for b in range(budget.shape[0]):
            total_candidates = sum(int(candidate_counts(s)[b].sum()) for s in inputs.scores)
            total = min(num_layers * heads * int(budget[b]), total_candidates)
            remaining = total - sum(int(f[b].sum()) for f in floors)
            if remaining <= 0:
                continue
            flat = torch.cat([rest[b].reshape(-1) for rest in sorted_rest])
            owner = torch.cat(
                [
                    (layer * heads + torch.arange(heads, device=device))[:, None].expand(heads, rest.shape[-1]).reshape(-1)
                    for layer, rest in enumerate(sorted_rest)
                ]
            )
            picks = owner[torch.topk(flat, remaining).indices]  # never -inf: remaining <= non-floor candidates
            per_head = torch.bincount(picks, minlength=num_layers * heads).reshape(num_layers, heads)
            for layer in range(num_layers):
                counts[layer][b] += per_head[layer]
        return counts
