"""KVMerger: runs of consecutive similar keys collapse onto their highest-attention token (Gaussian weights)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gatekv.merge.base import MergeContext, Merger, MergeSpec, check_unit_interval, register_merger, spec_from_targets

__all__ = ["KVMergerMerger", "merge_sets"]


def merge_sets(keys: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """Run id of every slot: consecutive candidate slots whose neighbouring keys have cosine similarity
    ``>= threshold`` share a run.

    keys: (B, H, T, d); candidates: (B, H, T) bool; returns (B, H, T) int64 run ids (non-candidates get their own)
    """
    unit = F.normalize(keys.float(), dim=-1)
    adjacent = (unit[:, :, 1:] * unit[:, :, :-1]).sum(-1)  # (B, H, T-1)
    joined = (adjacent >= threshold) & candidates[:, :, 1:] & candidates[:, :, :-1]
    starts = torch.cat([torch.ones_like(joined[..., :1]), ~joined], -1)
    return torch.cumsum(starts.long(), -1) - 1


@register_merger("kvmerger")
class KVMergerMerger(Merger):
    """Merge sets = runs of consecutive tokens whose neighbouring keys have cosine similarity ``>= threshold``.
    In each set the pivot is the kept member with the highest score (attention); every dropped member merges into
    it with weight ``exp(-(p_e - p_pivot)^2 / (2 sigma^2))`` (positions p; the pivot's own weight is 1). A set with
    no kept member is dropped as usual.

    threshold: cosine similarity in [-1, 1]; sigma: Gaussian width in tokens, > 0.
    """

    def __init__(self, threshold: float = 0.8, sigma: float = 4.0):
        self.threshold = check_unit_interval("kvmerger", "threshold", threshold, -1.0, 1.0)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"kvmerger: sigma must be a finite number > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def merge(self, ctx: MergeContext) -> MergeSpec:
        batch, heads, t = ctx.scores.shape
        runs = merge_sets(ctx.keys, ctx.candidates, self.threshold)
        kept = ctx.kept_mask()
        rank_score = ctx.scores.masked_fill(ctx.protected, float("inf")).nan_to_num(nan=-1e30, posinf=1e30)
        value = torch.where(kept, rank_score, torch.full_like(rank_score, float("-inf")))
        best = torch.full((batch, heads, t), float("-inf"), device=value.device)
        best = best.scatter_reduce(2, runs, value, reduce="amax")
        is_pivot = kept & (value == torch.gather(best, 2, runs))
        slot = torch.arange(t, device=value.device).expand(batch, heads, t)
        big = torch.full_like(slot, t)
        pivot = big.scatter_reduce(2, runs, torch.where(is_pivot, slot, big), reduce="amin")  # first pivot per run
        target = torch.gather(pivot, 2, runs)
        has_target = target < t
        target = torch.where(has_target, target, torch.full_like(target, -1))
        distance = (ctx.positions - torch.gather(ctx.positions, 2, target.clamp(min=0))).float()
        weights = torch.exp(-(distance**2) / (2 * self.sigma**2))
        return spec_from_targets(target, weights, ctx)
