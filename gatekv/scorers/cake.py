"""CAKE's token indicator: window-attention mean plus gamma times its variance over the window queries."""

import torch

from gatekv.scorers.base import LayerContext, Scorer, register_scorer
from gatekv.window_scores import check_pooling, pool_scores


@register_scorer("cake")
class CAKEScorer(Scorer):
    """CAKE (Qin et al., 2025) eviction indicator.

    For query head g over the n real window queries i (padding queries excluded):
    I_g[j] = mean_i A[g, i, j] + gamma * Var_i A[g, i, j] (unbiased variance, 0 when n = 1), 1-D avg-pooled over
    slots (kernel ``kernel_size``), then s_h[j] = mean over g in G(h) of pooled I_g[j]. Returns (B, H_kv, T).
    The variance term keeps tokens whose attention fluctuates (important to some queries only). CAKE's layer
    budgets are an allocator, not part of this scorer.
    """

    def __init__(self, window: int | None = None, gamma: float = 200.0, kernel_size: int = 5, pooling: str = "avg"):
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"cake: window must be a positive int or None, got {window!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0 or gamma == float("inf"):
            raise ValueError(f"cake: gamma must be a finite number >= 0, got {gamma!r}")
        check_pooling(kernel_size, pooling, "cake")
        self.window = window
        self.gamma = float(gamma)
        self.kernel_size = kernel_size
        self.pooling = pooling

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = ctx.window_attention(self.window)  # (B, H_q, w, T)
        batch, _, w, t = attention.shape
        _, window_positions = ctx.window_queries(w)
        real = (window_positions >= 0).float()[:, None, :, None]  # (B, 1, w, 1)
        count = real.sum(dim=2)  # (B, 1, 1)
        mean = (attention * real).sum(dim=2) / count.clamp(min=1.0)  # (B, H_q, T)
        squares = (((attention - mean[:, :, None]) * real) ** 2).sum(dim=2)
        variance = squares / (count - 1).clamp(min=1.0)
        indicator = pool_scores(mean + self.gamma * variance, self.kernel_size, self.pooling)
        return indicator.reshape(batch, ctx.num_kv_heads, ctx.group_size, t).mean(dim=2)
