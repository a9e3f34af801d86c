"""Optional flash-attn backend for ``ragged_attention`` (decode) through ``flash_attn_with_kvcache``.

The flat storage is handed to flash-attn without a copy: the whole buffer ``keys`` (N_cap, d) is one cache
"batch entry" ``(1, N_cap, 1, d)``, every segment (batch row, KV head) is a batch entry of the call that points
at it (``cache_batch_idx = 0``) and reads rows ``[cache_leftpad, cache_seqlens) = [starts, starts + lengths)``;
the G query heads of the segment's group are its heads. flash-attn masks by slot, not by position, so this path
applies only when every stored slot is a token the query may see (checked on the device: one host sync).

Needs flash-attn >= 2.6 (``cache_leftpad``). Import is guarded: without flash-attn ``is_available()`` is False.
"""

from __future__ import annotations

import inspect

import torch

try:
    from flash_attn import flash_attn_with_kvcache as _flash_attn_with_kvcache
except Exception:  # not installed, or a build that fails to load (ImportError, OSError, RuntimeError)
    _flash_attn_with_kvcache = None

__all__ = ["is_available", "ragged_attention", "supports"]


def is_available() -> bool:
    """flash-attn is importable and its ``flash_attn_with_kvcache`` takes ``cache_leftpad``."""
    if _flash_attn_with_kvcache is None:
        return False
    try:
        return "cache_leftpad" in inspect.signature(_flash_attn_with_kvcache).parameters
    except (TypeError, ValueError):
        return False


def supports(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, sliding_window: int | None) -> bool:
    """Static conditions (no device work): CUDA, one query per row, fp16/bf16, d_k == d_v <= 256, no window.

    query: (B, H_q, q, d); keys, values: (N_cap, d)
    """
    return (
        is_available()
        and query.is_cuda
        and query.shape[2] == 1
        and sliding_window is None
        and query.dtype in (torch.float16, torch.bfloat16)
        and keys.dtype == query.dtype
        and values.dtype == query.dtype
        and keys.shape[1] == values.shape[1]
        and keys.shape[1] % 8 == 0
        and keys.shape[1] <= 256
        and keys.stride(1) == 1
        and values.stride(1) == 1
        and keys.shape[0] < 2**31
    )


def _every_slot_visible(query_positions, positions, starts, lengths, num_kv_heads) -> bool:
    """Segments are disjoint and ordered, and every filled slot holds a token at or before its row's query.

    query_positions: (B, 1); positions: (N_cap,); starts, lengths: (S,) int64 on the device
    """
    rows = torch.arange(positions.shape[0], device=positions.device)
    segment = (torch.searchsorted(starts, rows, right=True) - 1).clamp(min=0)
    filled = (rows >= starts[segment]) & (rows - starts[segment] < lengths[segment])
    query_pos = query_positions[:, 0][segment // num_kv_heads]
    hidden = filled & ((positions < 0) | (positions > query_pos))
    disjoint = (starts[1:] >= starts[:-1] + lengths[:-1]).all()
    return bool((disjoint & ~hidden.any()).item())


def ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale, check=True):
    """Decode attention over the ragged cache with flash-attn, or None when the cache does not fit its model.

    query: (B, H_q, 1, d); query_positions: (B, 1); keys, values: (N_cap, d); positions: (N_cap,);
    starts, lengths: (S,) with S = B * H_kv. returns: (B, H_q, 1, d) in the query's dtype, or None.
    check: verify on the device that every filled slot is visible to its query (one host sync); pass False
    only when the caller guarantees it. Call ``supports`` first.
    """
    batch, num_q_heads, _, head_dim = query.shape
    num_segments = starts.shape[0]
    num_kv_heads = num_segments // batch
    group = num_q_heads // num_kv_heads
    device = query.device
    starts = starts.to(device=device, dtype=torch.int64)
    lengths = lengths.to(device=device, dtype=torch.int64)
    if check and not _every_slot_visible(query_positions, positions, starts, lengths, num_kv_heads):
        return None
    num_rows = keys.shape[0]
    # (1, N_cap, 1, d) views of the flat buffers: no copy
    k_cache = keys.as_strided(
        (1, num_rows, 1, head_dim), (num_rows * keys.stride(0), keys.stride(0), keys.stride(0), 1)
    )
    v_cache = values.as_strided(
        (1, num_rows, 1, head_dim), (num_rows * values.stride(0), values.stride(0), values.stride(0), 1)
    )
    q = query[:, :, 0, :].reshape(num_segments, 1, group, head_dim).contiguous()  # (S, 1, G, d)
    out = _flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=(starts + lengths).to(torch.int32),
        cache_batch_idx=torch.zeros(num_segments, dtype=torch.int32, device=device),
        cache_leftpad=starts.to(torch.int32),
        softmax_scale=float(scale),
        causal=False,
    )
    out = out.reshape(num_segments, group, head_dim)
    out = torch.where((lengths > 0)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=device))
    return out.reshape(batch, num_q_heads, 1, head_dim)
