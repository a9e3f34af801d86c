"""Statistics of the observation window's attention shared by scorers and allocators, which never import each other:
1-D pooling along slots and DefensiveKV's defensive aggregation (``scorers/defensivekv.py`` scores with it,
``allocators/defensive_budget.py`` takes its per-head budgets from it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_pooling", "defensive_scores", "pool_scores"]


def _window_sums(scores: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``out[..., j] = sum of scores[..., j - left : j + right + 1]`` over the slots inside the row: one copy and
    ``left + right`` shifted in-place adds (no padded copy)."""
    out = scores.clone()
    for shift in range(1, right + 1):
        out[..., :-shift] += scores[..., shift:]
    for shift in range(1, left + 1):
        out[..., shift:] += scores[..., :-shift]
    return out


def _window_counts(length: int, left: int, right: int, like: torch.Tensor) -> torch.Tensor:
    """(length,) number of slots inside the row in each window ``[j - left, j + right]``, dtype/device of ``like``."""
    slots = torch.arange(length, device=like.device)
    return ((slots + right + 1).clamp(max=length) - (slots - left).clamp(min=0)).to(like.dtype)


def _window_bounds(kernel_size: int) -> tuple[int, int]:
    """(left, right): a window of ``kernel_size`` slots centred on its slot, an even one reaching further left."""
    left = kernel_size // 2
    return left, kernel_size - 1 - left


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along slots with stride 1 and padding ``kernel_size // 2`` (``avg_pool1d`` with
    ``count_include_pad=False`` / ``max_pool1d``). An even kernel is trimmed back to ``T`` on the right.

    scores: (B, H, T) ; returns (B, H, T). The average is ``kernel_size - 1`` shifted adds over the count of real
    slots: on CPU ~6x faster than ``avg_pool1d`` over DefensiveKV's B x H_q x w rows.
    """
    if kernel_size <= 1:
        return scores
    batch, heads, t = scores.shape
    if pooling == "max":  # max_pool1d is fast on CPU already
        flat = scores.reshape(batch * heads, 1, t)
        return F.max_pool1d(flat, kernel_size, stride=1, padding=kernel_size // 2)[..., :t].reshape(batch, heads, t)
    left, right = _window_bounds(kernel_size)
    return _window_sums(scores, left, right) / _window_counts(t, left, right, scores)


def check_pooling(kernel_size: int, pooling: str, owner: str) -> None:
    """Validate pooling hyper-parameters (ValueError naming the bad one)."""
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"{owner}: kernel_size must be a positive int, got {kernel_size!r}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"{owner}: pooling must be 'avg' or 'max', got {pooling!r}")


def defensive_scores(attention: torch.Tensor, candidates: torch.Tensor, kernel_size: int = 5,
                     pooling: str = "avg") -> torch.Tensor:
    """DefensiveKV's scores (without the CriticalKV factor) from the window attention.

    attention: (B, H_q, w, T) softmax weights of the window queries; candidates: (B, H_kv, T) bool.
    Each row is pooled over slots and rescaled to keep its mass; per KV head the max over window queries and the
    group's query heads; floored at the head's mean over candidates. Returns (B, H_kv, T) float32: attention
    probabilities, on the same scale in every layer.
    """
    batch, num_q, w, t = attention.shape
    kv_heads = candidates.shape[1]
    rows = attention.reshape(batch, num_q * w, t)
    mass = rows.sum(-1, keepdim=True)
    if pooling == "avg" and kernel_size > 1:
        # pooled = sums / counts, rescaled per row by mass / pooled.sum(-1). That row sum is rows @ in_windows
        # (in_windows[i]: the sum of 1 / counts over the windows holding slot i), and the max over rows commutes
        # with the division by counts (> 0): so the scale goes on the raw window sums and the division on the
        # (B, H_kv, T) max only, two passes fewer over the B x H_q x w rows than pooling them first.
        left, right = _window_bounds(kernel_size)
        counts = _window_counts(t, left, right, rows)
        in_windows = _window_sums(counts.reciprocal(), right, left)  # windows holding slot i: [i - right, i + left]
        sums = _window_sums(rows, left, right)
        sums *= mass / (rows @ in_windows)[..., None].clamp(min=1e-30)
        heaviest = sums.reshape(batch, kv_heads, (num_q // kv_heads) * w, t).amax(dim=2) / counts
    else:
        pooled = pool_scores(rows, kernel_size, pooling)
        pooled = pooled * (mass / pooled.sum(-1, keepdim=True).clamp(min=1e-30))
        heaviest = pooled.reshape(batch, kv_heads, (num_q // kv_heads) * w, t).amax(dim=2)  # (B, H_kv, T)
    weight = candidates.float()
    floor = (heaviest * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.maximum(heaviest, floor)
