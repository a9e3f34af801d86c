"""EMS: a global-local importance score; evict, then merge each evicted token into its most similar kept token."""

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
from gatekv.scorers.base import LayerContext, Scorer, register_scorer
from gatekv.scorers.h2o import H2OScorer

__all__ = ["EMSMerger", "EMSScorer"]


@register_scorer("ems")
class EMSScorer(Scorer):
    """``s = alpha * G / sum G + (1 - alpha) * L / sum L`` per head: G = H2O's accumulated attention over every query
    that saw the token (global), L = attention of the recent window queries, mean over the GQA group (local); each
    normalised over the head's slots so the two are comparable.

    alpha: weight of the global term in [0, 1]; query_block: block size of the accumulation.
    """

    state_names = H2OScorer.state_names

    def __init__(self, alpha: float = 0.5, query_block: int = 256):
        self.alpha = check_unit_interval("ems", "alpha", alpha)
        self._global = H2OScorer(query_block)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        global_part = torch.nan_to_num(self._global.score(ctx), nan=0.0)  # (B, H_kv, T)
        attention = ctx.window_attention()  # (B, H_q, w, T)
        batch, _, _, t = attention.shape
        local = attention.mean(2).reshape(batch, ctx.num_kv_heads, ctx.group_size, t).mean(2)
        normalise = lambda s: s / s.sum(-1, keepdim=True).clamp(min=1e-30)  # noqa: E731
        return self.alpha * normalise(global_part) + (1.0 - self.alpha) * normalise(local)


@register_merger("ems")
class EMSMerger(Merger):
    """Each dropped token merges (weight 1) into the kept token of the same head with the most cosine-similar key,
    if that similarity is at least ``min_similarity`` (in [-1, 1]; -1 = always merge)."""

    def __init__(self, min_similarity: float = -1.0):
        self.min_similarity = check_unit_interval("ems", "min_similarity", min_similarity, -1.0, 1.0)

    def merge(self, ctx: MergeContext) -> MergeSpec:
        similarity, slot = most_similar_kept(ctx.keys, ctx.kept_indices, ctx.kept_counts)
        target = torch.where(similarity >= self.min_similarity, slot, torch.full_like(slot, -1))
        return spec_from_targets(target, torch.ones_like(similarity), ctx)
