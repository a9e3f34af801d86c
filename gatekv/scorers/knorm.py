"""KNorm: tokens with a small key norm are the important ones (score = -||k_j||)."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer


@register_scorer("knorm")
class KNormScorer(Scorer):
    """Score = negative L2 norm of the key (RoPE is a rotation, so pre- and post-RoPE norms agree)."""

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
