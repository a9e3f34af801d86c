"""Uniform allocation: every KV head of every layer keeps the same number of tokens."""

import torch

from gatekv.allocators.base import AllocationInput, Allocator, register_allocator


@register_allocator("uniform")
class UniformAllocator(Allocator):
    """Every head keeps ``budget`` slots (its top-scored ones, protected first), or all its candidates if fewer."""

    def layer_counts(self, inputs: AllocationInput) -> list[torch.Tensor]:
        return [inputs.budget[:, None].expand_as(inputs.protected[layer][..., 0]).clone() for layer in range(len(inputs.scores))]
