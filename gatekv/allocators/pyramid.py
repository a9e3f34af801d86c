"""PyramidKV: layer-wise budgets decreasing linearly with depth (uniform across heads inside a layer)."""

import torch

from gatekv.allocators.base import AllocationInput, Allocator, candidate_counts, register_allocator


@register_allocator("pyramid")
class PyramidAllocator(Allocator):
    """With ``cap`` = budget per head (window included), ``w`` = window, ``L`` = candidates, ``N`` = layers:
    ``min = (cap - w) / beta``, ``max = min(2 (cap - w) - min, L - w)``,
    ``b_l = round(max - l (max - min) / (N - 1))``; every head of layer ``l`` keeps ``b_l + w`` slots.
    """

    def __init__(self, beta: float = 20.0):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
            raise ValueError(f"pyramid: beta must be a number >= 1, got {beta!r}")
        self.beta = float(beta)

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        num_layers = len(inputs.scores)
        w = inputs.window
        counts = []
        for layer in range(num_layers):
            candidates = candidate_counts(inputs.scores[layer])  # (B, H)
            length = candidates.max(dim=-1).values.double()  # (B,)
            base = (inputs.budget.double() - w).clamp(min=0)
            low = base / self.beta
            high = torch.minimum(2 * base - low, (length - w).clamp(min=0))
            if num_layers > 1:
                per_layer = torch.round(high - layer * (high - low) / (num_layers - 1))
            else:
                per_layer = base
            counts.append((per_layer.long() + w)[:, None].expand_as(candidates).clone())
        return counts
