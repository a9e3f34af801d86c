"""Fast PyTorch path for single-token decode over the ragged cache (CPU, or GPU without Triton).

When every filled slot holds a real token older than the query and no sliding window can cut in (the caller
knows this from the cache's bookkeeping), decode attention needs no mask: each segment is one SDPA call in which
the ``G`` query heads of a GQA group act as ``G`` queries of one head, reading the segment's keys once, in place
(no gather, no copy). Equal to ``reference.ragged_attention_reference`` within float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ragged_attention_sdpa", "ragged_decode_unmasked"]


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
    out = query.new_zeros(batch, num_q_heads, 1, values.shape[-1])
    grouped = query.reshape(batch, num_kv_heads, 1, group, head_dim)  # G query heads as G queries
    for s in range(num_segments):
        length = lengths[s]
        if length == 0:
            continue
        b, h = divmod(s, num_kv_heads)
        start = starts[s]
        k = keys[start : start + length].unsqueeze(0).unsqueeze(0)
        v = values[start : start + length].unsqueeze(0).unsqueeze(0)
        attended = F.scaled_dot_product_attention(grouped[b, h][None].to(k.dtype), k, v, scale=scale)
        out[b, h * group : (h + 1) * group, 0] = attended[0, 0].to(out.dtype)
    return out


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
