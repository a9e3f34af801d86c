"""SnapKV: observation-window attention, averaged over the window and the GQA group, then pooled."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer
from gatekv.window_scores import check_pooling, pool_scores


@register_scorer("snapkv")
class SnapKVScorer(Scorer):
    """s_h[j] = pool(mean over window queries i and group heads g in G(h) of A[i, j]).

    window: number of observation queries (default: the session's window); kernel_size/pooling: 1-D pooling.
    """

    def __init__(self, window: int | None = None, kernel_size: int = 5, pooling: str = "avg"):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"snapkv: window must be a positive int or None, got {window!r}")
        check_pooling(kernel_size, pooling, "snapkv")
        self.window = window
        self.kernel_size = kernel_size
        self.pooling = pooling

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = ctx.window_attention(self.window)  # (B, H_q, w, T)
        batch, _, _, t = attention.shape
        per_kv = attention.mean(dim=2).reshape(batch, ctx.num_kv_heads, ctx.group_size, t).mean(dim=2)
        return pool_scores(per_kv, self.kernel_size, self.pooling)
