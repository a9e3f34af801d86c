"""RazorAttention's compensation token: a non-retrieval head's dropped tokens fold into one kept token (their mean)."""

from __future__ import annotations

import torch

from gatekv.merge.base import MergeContext, Merger, MergeSpec, register_merger, spec_from_targets

__all__ = ["RazorMerger"]


@register_merger("razor")
class RazorMerger(Merger):
    """Per head, the carrier is the most recent kept unprotected token; every dropped token merges into it with
    weight 1, so it becomes the mean of the carrier and the dropped keys and values (the compensation token). Use
    with allocator ``razor``, which keeps sinks + window + one carrier in non-retrieval heads and everything in
    retrieval heads (nothing dropped there, so nothing merged)."""

    def merge(self, ctx: MergeContext) -> MergeSpec:
        t = ctx.scores.shape[-1]
        free_kept = ctx.kept_mask() & ~ctx.protected
        slot = torch.arange(t, device=ctx.scores.device).expand_as(free_kept)
        carrier = torch.where(free_kept, ctx.positions, torch.full_like(ctx.positions, -1)).argmax(-1, keepdim=True)
        has_carrier = free_kept.any(-1, keepdim=True)
        target = torch.where(has_carrier, carrier, torch.full_like(carrier, -1)).expand_as(slot)
        return spec_from_targets(target, torch.ones_like(ctx.scores), ctx)
