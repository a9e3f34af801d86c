"""D2O's layer budgets: denser attention, more budget (merging of the evicted tokens: merger ``d2o``)."""

from __future__ import annotations

import torch

from gatekv.allocators.base import register_allocator
from gatekv.allocators.cake import CakeAllocator

__all__ = ["D2OAllocator", "attention_density"]


def attention_density(attention: torch.Tensor) -> torch.Tensor:
    """How spread a layer's window attention is, per batch row, in (0, 1].

    attention: (B, H_q, w, T) softmax weights (padding query rows all zero, ignored)
    returns:   (B,) float64 mean over heads and real queries of ``1 / (n * sum_j A_ij^2)`` with n the query's
               attended slots (the inverse participation ratio: 1 = uniform, 1/n = a single token)
    """
    a = attention.double()
    real = a.sum(-1) > 0
    seen = (a > 0).sum(-1).clamp(min=1)
    density = 1.0 / (seen * (a**2).sum(-1)).clamp(min=1e-30)
    density = torch.where(real, density, torch.zeros_like(density))
    return density.sum((1, 2)) / real.sum((1, 2)).clamp(min=1)


@register_allocator("d2o")
class D2OAllocator(CakeAllocator):
    """Layer budgets ``B_l = D_l / sum D * N (B - w)`` (capped at ``L - w``, redistributed), D_l the layer's attention
    density (:func:`attention_density`); every head of the layer keeps ``B_l + w``. No cascade."""

    cascade = False

    def __init__(self):
        super().__init__()

    def observe_layer(self, layer_idx: int, attention: torch.Tensor, candidates: torch.Tensor) -> None:
        self._preference[layer_idx] = attention_density(attention).cpu()
        self._length[layer_idx] = candidates.sum(-1).amax(-1).cpu()
