"""Random scores: the baseline every scorer must beat."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer


@register_scorer("random")
class RandomScorer(Scorer):
    """Independent uniform scores, reproducible from ``seed`` (one stream per layer and cache length)."""

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int):
            raise ValueError(f"random scorer: seed must be an int, got {seed!r}")
        self.seed = seed

    def score(self, ctx: LayerContext) -> torch.Tensor:
        # One stream per (seed, layer, cache length): reproducible, different for every layer and step.
        step = int(ctx.positions.max().item()) + 1
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx * 7919 + step)
        return torch.rand(ctx.positions.shape, generator=generator).to(ctx.keys.device)
