"""SnapKV: observation-window attention, averaged over the window and the GQA group, then pooled."""

import torch
import torch.nn.functional as F

from gatekv.scorers.base import LayerContext, Scorer, register_scorer


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along slots with stride 1 and padding ``kernel_size // 2``.

    scores: (B, H, T) ; returns (B, H, T). An even kernel is trimmed back to ``T`` on the right.
    """
    if kernel_size <= 1:
        return scores
    batch, heads, t = scores.shape
    flat = scores.reshape(batch * heads, 1, t)
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
    return pooled[..., :t].reshape(batch, heads, t)


def check_pooling(kernel_size: int, pooling: str, owner: str) -> None:
    """Validate pooling hyper-parameters (ValueError naming the bad one)."""
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"{owner}: kernel_size must be a positive int, got {kernel_size!r}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"{owner}: pooling must be 'avg' or 'max', got {pooling!r}")


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
