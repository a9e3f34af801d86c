"""Fast PyTorch path for single-token decode over the ragged cache (CPU, or GPU without Triton).

When every filled slot holds a real token older than the query and no sliding window can cut in (the caller
knows this from the cache's bookkeeping), decode attention needs no position mask. Two layouts:

- *regular*: segment ``s`` starts at row ``s * c`` for one stride ``c`` (every segment of the layer has the same
  capacity, as after a uniform allocation): the flat buffers are viewed in place as dense ``(B, H_kv, L, d)``
  tensors (no copy) and one SDPA call with ``enable_gqa`` serves every row and head, as for a dense cache of
  ``L`` tokens; shorter segments are masked past their length.
- otherwise one SDPA call per segment, in which the ``G`` query heads of a GQA group act as ``G`` queries of one
  head, reading the segment's keys in place.

Equal to ``reference.ragged_attention_reference`` within the kernels' tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ragged_attention_sdpa", "ragged_decode_unmasked", "regular_stride", "segments_view"]


def regular_stride(starts: list[int], lengths: list[int], rows: int) -> int | None:
    """The stride ``c`` of a regular layout, or None.

    starts/lengths: per segment (S,) as lists; rows: rows of the flat buffers. Regular: segment ``s`` starts at row
    ``s * c``, no segment holds more than ``c`` slots, and the last one's ``max(lengths)`` rows fit in the buffer, so
    ``(S, max(lengths))`` rows at stride ``c`` read only slots of their own segment (or its free room).
    """
    num_segments = len(starts)
    if num_segments == 0:
        return None
    longest = max(lengths)
    stride = starts[1] - starts[0] if num_segments > 1 else max(longest, 1)
    if starts[0] != 0 or longest > stride or (num_segments - 1) * stride + longest > rows:
        return None
    for s in range(1, num_segments):
        if starts[s] != s * stride:
            return None
    return stride


def segments_view(buffer: torch.Tensor, batch: int, kv_heads: int, stride: int, length: int) -> torch.Tensor:
    """The flat buffer (N_cap, d) of a regular layout as a (B, H_kv, length, d) view: segment b * H_kv + h at [b, h]."""
    row, col = buffer.stride()
    return buffer.as_strided(
        (batch, kv_heads, length, buffer.shape[1]), (kv_heads * stride * row, stride * row, row, col),
        buffer.storage_offset(),
    )


def ragged_decode_unmasked(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: list[int],
    lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """Decode attention of one query token per row over every filled slot of its segments.

    query:   (B, H_q, 1, d) post-RoPE
    keys:    (N_cap, d), values: (N_cap, d_v) flat storage; starts/lengths: per segment (S = B * H_kv) as lists
    returns: (B, H_q, 1, d_v); a segment of length 0 gives zeros
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    if q_len != 1:
        raise ValueError(f"query must hold exactly one token per row, got q = {q_len}")
    num_segments = len(starts)
    num_kv_heads = num_segments // batch
    group = num_q_heads // num_kv_heads
    longest = max(lengths) if lengths else 0
    if longest == 0:
        return query.new_zeros(batch, num_q_heads, 1, values.shape[-1])
    stride = regular_stride(starts, lengths, min(keys.shape[0], values.shape[0]))
    if stride is not None:
        k = segments_view(keys, batch, num_kv_heads, stride, longest)
        v = segments_view(values, batch, num_kv_heads, stride, longest)
        mask = None
        if min(lengths) < longest:  # shorter segments: their slots past the length are another token's room
            counts = torch.tensor(lengths, device=keys.device).reshape(batch, num_kv_heads, 1, 1)
            mask = torch.arange(longest, device=keys.device) < counts  # (B, H_kv, 1, L)
            mask = mask.repeat_interleave(group, dim=1)  # (B, H_q, 1, L)
        out = F.scaled_dot_product_attention(
            query.to(k.dtype), k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1
        ).to(query.dtype)
        if min(lengths) == 0:  # a row of the mask with no key: zeros, not SDPA's NaN
            empty = (counts == 0).repeat_interleave(group, dim=1)
            out = out.masked_fill(empty, 0.0)
        return out
    grouped = query.reshape(batch, num_kv_heads, group, head_dim)  # G query heads as G queries
    pieces = []
    for s in range(num_segments):
        length = lengths[s]
        if length == 0:
            pieces.append(query.new_zeros(group, values.shape[-1]))
            continue
        b, h = divmod(s, num_kv_heads)
        start = starts[s]
        k = keys[start : start + length][None, None]
        v = values[start : start + length][None, None]
        attended = F.scaled_dot_product_attention(grouped[b, h][None, None].to(k.dtype), k, v, scale=scale)
        pieces.append(attended[0, 0])
    return torch.cat(pieces).to(query.dtype).reshape(batch, num_q_heads, 1, values.shape[-1])


def ragged_attention_sdpa(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    starts: list[int],
    lengths: list[int],
    scale: float,
    sliding_window: int | None = None,
    query_block: int = 2048,
) -> torch.Tensor:
    """Masked causal GQA attention of several queries per row (prefill chunks) over the ragged cache.

    Same contract as ``reference.ragged_attention_reference``; each segment is read in place and handed to
    ``scaled_dot_product_attention`` (fused, no logits materialised by us) with a boolean (q, L) mask built from
    positions. The G query heads of a group share the segment's keys (``enable_gqa``).
    """
    batch, num_q_heads, q_len, _ = query.shape
    num_segments = len(starts)
    num_kv_heads = num_segments // batch
    group = num_q_heads // num_kv_heads
    out = query.new_zeros(batch, num_q_heads, q_len, values.shape[-1])
    for s in range(num_segments):
        length = lengths[s]
        if length == 0:
            continue
        b, h = divmod(s, num_kv_heads)
        start = starts[s]
        k = keys[start : start + length][None, None]
        v = values[start : start + length][None, None]
        key_positions = positions[start : start + length]
        for q0 in range(0, q_len, query_block):
            q1 = min(q_len, q0 + query_block)
            query_pos = query_positions[b, q0:q1]
            rel = query_pos[:, None] - key_positions[None, :]
            allowed = (key_positions[None, :] >= 0) & (rel >= 0)
            if sliding_window is not None:
                allowed &= rel < sliding_window
            q = query[b, h * group : (h + 1) * group, q0:q1][None].to(k.dtype)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=scale, enable_gqa=True)
            attended = torch.where(allowed.any(-1)[None, None, :, None], attended, torch.zeros_like(attended))
            out[b, h * group : (h + 1) * group, q0:q1] = attended[0].to(out.dtype)
    return out
