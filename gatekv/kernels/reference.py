"""Plain PyTorch reference for the ragged KV-cache kernels: the executable specification.

Storage layout (one layer). The cache of a layer is a set of *segments*, one per (batch row, KV head) pair,
``s = b * H_kv + h``. Every segment owns a contiguous region of a flat buffer:

- ``keys``      (N_cap, d_k)  post-RoPE keys, segment ``s`` in rows ``starts[s] : starts[s] + caps[s]``
- ``values``    (N_cap, d_v)
- ``positions`` (N_cap,) int64 original RoPE position of the token held in a slot; ``-1`` = not a token
  (left padding, or an unused slot)
- ``starts``    (S,) int64 first row of each segment; segments are laid out in order, ``starts[0] == 0``
- ``caps``      (S,) int64 capacity of each segment (rows reserved)
- ``lengths``   (S,) int64 number of filled slots of each segment (``0 <= lengths <= caps``)

Only slots ``< lengths[s]`` hold tokens; slots in ``[lengths, caps)`` are growth room so that appending a
decoded token never copies the cache. Every function here is pure PyTorch: the Triton kernels in this package
must return exactly the same data (data movement) or the same values within the stated tolerances (arithmetic).
"""

from __future__ import annotations

import torch

__all__ = [
    "append_reference",
    "column_max_logits_reference",
    "compact_reference",
    "evict_in_place_reference",
    "layout_from_caps",
    "merge_reference",
    "ragged_attention_reference",
    "window_attention_reference",
]


def layout_from_caps(caps: torch.Tensor, order: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Segment start rows for capacities ``caps`` (S,): returns ``(starts (S,), total_rows)``.

    order: the segments in the order they are laid out one after another (a permutation of ``range(S)``);
    None = segment order."""
    caps = caps.to(torch.int64)
    if order is not None:
        index = torch.as_tensor(order, dtype=torch.int64, device=caps.device)
        expected = torch.arange(caps.numel(), device=caps.device)
        if index.shape != caps.shape or not torch.equal(torch.sort(index).values, expected):
            raise ValueError(f"order must be a permutation of range({caps.numel()}), got {order!r}")
        placed = caps[index]
        starts = torch.empty_like(caps)
        starts[index] = torch.cumsum(placed, 0) - placed
        return starts, int(caps.sum().item())
    starts = torch.zeros_like(caps)
    if caps.numel() > 1:
        starts[1:] = torch.cumsum(caps, 0)[:-1]
    return starts, int(caps.sum().item())


def compact_reference(
    src: list[torch.Tensor],
    src_starts: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    dst_starts: torch.Tensor,
    dst_rows: int,
    fill: list[float | int] | None = None,
) -> list[torch.Tensor]:
    """Gather the kept slots of every segment into a new flat buffer.

    src:        list of flat buffers, each (N_src, *feature) (keys, values, positions, per-slot scorer state)
    src_starts: (S,) first row of each segment in ``src``
    indices:    (S, K_max) int64 slot indices *within* the segment, sorted ascending; entries ``>= counts`` ignored
    counts:     (S,) int64 number of kept slots per segment
    dst_starts: (S,) first row of each segment in the output (its capacity is at least ``counts``)
    dst_rows:   total rows of the output
    fill:       value of output rows that receive no token, one per buffer (default 0; use -1 for positions)
    returns:    list of flat buffers (dst_rows, *feature), kept slot ``k`` of segment ``s`` at ``dst_starts[s] + k``
    """
    num_segments, k_max = indices.shape
    device = src_starts.device
    rank = torch.arange(k_max, device=device).expand(num_segments, k_max)
    keep = rank < counts.to(device)[:, None]
    src_rows = (src_starts[:, None] + indices.to(device))[keep]
    dst_rows_idx = (dst_starts[:, None] + rank)[keep]
    out = []
    for i, buf in enumerate(src):
        value = 0 if fill is None else fill[i]
        dst = torch.full((dst_rows, *buf.shape[1:]), value, dtype=buf.dtype, device=buf.device)
        dst[dst_rows_idx] = buf[src_rows]
        out.append(dst)
    return out


def append_reference(
    dst: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, new: list[torch.Tensor]
) -> None:
    """Write new tokens at the end of each segment, in place.

    dst:     list of flat buffers (N_cap, *feature); the caller guarantees ``lengths + q <= caps``
    starts:  (S,) first row of each segment
    lengths: (S,) filled slots of each segment *before* the append (not modified here)
    new:     list of tensors (S, q, *feature), token ``i`` of segment ``s`` goes to row ``starts[s] + lengths[s] + i``
    """
    num_segments, q = new[0].shape[:2]
    rows = (starts + lengths)[:, None] + torch.arange(q, device=starts.device)[None, :]
    rows = rows.reshape(-1)
    for buf, tokens in zip(dst, new):
        buf[rows] = tokens.reshape(num_segments * q, *tokens.shape[2:]).to(buf.dtype)


def evict_in_place_reference(
    buffers: list[torch.Tensor],
    starts: torch.Tensor,
    lengths: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
) -> None:
    """Evict inside each segment's own slots, in place: O(evicted tokens) data movement, no new buffer.

    buffers: flat buffers (N_cap, *feature) (keys, values, positions, per-slot state)
    starts:  (S,) first row of each segment; lengths: (S,) filled slots before the eviction (not modified here)
    indices: (S, K_max) int64 slots kept *within* the segment (any order); entries ``>= counts`` ignored
    counts:  (S,) int64 kept slots per segment

    Afterwards segment ``s``'s first ``counts[s]`` slots hold exactly its kept tokens: kept slots already below
    ``counts[s]`` stay where they are, and each kept slot at or above ``counts[s]`` moves into a dropped slot below
    it (the j-th such slot into the j-th hole). Slot order is therefore not position order; the caller sets
    ``lengths = counts``.
    """
    num_segments, k_max = indices.shape
    device = starts.device
    width = int(lengths.max().item()) if lengths.numel() else 0
    if width == 0:
        return
    counts = counts.to(device)
    rank = torch.arange(k_max, device=device)[None, :] < counts[:, None]
    if bool((counts == lengths.to(device) - 1).all()):
        # one slot dropped per segment (a decode_budget step): it is the one slot id missing from the kept ones, and
        # the segment's last slot moves into it (onto itself when the last slot is the dropped one), the same moves
        # as the general path below in 3 ops instead of ~15 over (S, width)
        lengths = lengths.to(device)
        kept_sum = torch.where(rank, indices.to(device), torch.zeros_like(indices, device=device)).sum(-1)
        dropped = lengths * (lengths - 1) // 2 - kept_sum
        holes, movers = starts + dropped, starts + lengths - 1
        for buf in buffers:
            buf[holes] = buf[movers]
        return
    keep = torch.zeros(num_segments, width + 1, dtype=torch.bool, device=device)
    keep.scatter_(1, torch.where(rank, indices.to(device), torch.full_like(indices.to(device), width)), True)
    keep = keep[:, :width]
    slot = torch.arange(width, device=device)[None, :]
    filled = slot < lengths.to(device)[:, None]
    below = slot < counts[:, None]
    rows = starts[:, None] + slot
    holes = rows[filled & below & ~keep]  # row-major: by segment, then slot
    movers = rows[keep & ~below]
    for buf in buffers:
        buf[holes] = buf[movers]


def merge_reference(
    dst: list[torch.Tensor],
    dst_starts: torch.Tensor,
    src: list[torch.Tensor],
    src_starts: torch.Tensor,
    sources: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    source_counts: torch.Tensor,
) -> None:
    """Merge dropped tokens into kept ones, in place in the compacted storage (EMS, D2O, KVMerger, Razor).

    dst:           compacted flat buffers (N_dst, *feature) (keys, values) holding the kept tokens
    dst_starts:    (S,) first row of each segment in ``dst``
    src:           the buffers before compaction (N_src, *feature), same order as ``dst``
    src_starts:    (S,) first row of each segment in ``src``
    sources:       (S, E) int64 slot of a dropped token *within* its source segment
    targets:       (S, E) int64 rank of the kept token it merges into (its slot within the compacted segment)
    weights:       (S, E) float weight ``w_e >= 0`` of each merged token
    source_counts: (S,) int64 valid entries per segment; entries ``>= source_counts`` are ignored

    Every kept slot ``r`` that receives merged tokens becomes ``(x_r + sum_e w_e x_e) / (1 + sum_e w_e)`` (the kept
    token has weight 1), computed in float32 and stored in the buffer's dtype; other slots are untouched.
    """
    num_segments, e_max = sources.shape
    if e_max == 0:
        return
    device = dst_starts.device
    valid = torch.arange(e_max, device=device)[None, :] < source_counts.to(device)[:, None]
    src_rows = (src_starts[:, None] + sources.to(device))[valid]
    dst_rows = (dst_starts[:, None] + targets.to(device))[valid]
    w = weights.to(device).float()[valid]
    if dst_rows.numel() == 0:
        return
    total = torch.zeros(dst[0].shape[0], device=device).index_add_(0, dst_rows, w)
    touched = torch.unique(dst_rows)
    for out, buf in zip(dst, src):
        acc = torch.zeros(out.shape, dtype=torch.float32, device=device)
        acc.index_add_(0, dst_rows, buf[src_rows].float() * w.reshape(-1, *([1] * (buf.dim() - 1))))
        norm = (1.0 + total[touched]).reshape(-1, *([1] * (buf.dim() - 1)))
        out[touched] = ((out[touched].float() + acc[touched]) / norm).to(out.dtype)


def _segment_mask(
    key_positions: torch.Tensor, query_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """Allowed (query, key) pairs: key is a token, not in the query's future, inside the sliding window.

    key_positions: (L,) ; query_positions: (q,) ; returns (q, L) bool
    """
    rel = query_positions[:, None] - key_positions[None, :]
    allowed = (key_positions[None, :] >= 0) & (rel >= 0)
    if sliding_window is not None:
        allowed &= rel < sliding_window
    return allowed


def ragged_attention_reference(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    query_block: int = 1024,
) -> torch.Tensor:
    """Causal GQA attention of new queries over the ragged per-(row, KV head) cache.

    query:           (B, H_q, q, d) post-RoPE queries; query head ``j`` reads KV head ``j // (H_q // H_kv)``
    query_positions: (B, q) RoPE position of each query; key slot allowed iff its position is ``>= 0`` and
                     ``<= query position`` (and, with ``sliding_window``, ``query pos - key pos < sliding_window``)
    keys, values, positions, starts, lengths: the layer storage (module docstring), S = B * H_kv segments
    returns:         (B, H_q, q, d_v) in the query's dtype; a query with no allowed key gets zeros

    Each segment is read once for all ``G = H_q // H_kv`` query heads of its group (no KV repetition).
    """
    batch, num_q_heads, q_len, _ = query.shape
    num_segments = starts.numel()
    num_kv_heads = num_segments // batch
    group = num_q_heads // num_kv_heads
    out = query.new_zeros(batch, num_q_heads, q_len, values.shape[-1])
    starts_list = starts.tolist()
    lengths_list = lengths.tolist()
    for s in range(num_segments):
        length = lengths_list[s]
        if length == 0:
            continue
        b, h = divmod(s, num_kv_heads)
        start = starts_list[s]
        k = keys[start : start + length]
        v = values[start : start + length]
        kpos = positions[start : start + length]
        q_group = query[b, h * group : (h + 1) * group]  # (G, q, d)
        for q0 in range(0, q_len, query_block):
            q1 = min(q_len, q0 + query_block)
            allowed = _segment_mask(kpos, query_positions[b, q0:q1], sliding_window)  # (qb, L)
            logits = torch.matmul(q_group[:, q0:q1].float(), k.float().transpose(0, 1)) * scale  # (G, qb, L)
            logits = logits.masked_fill(~allowed, float("-inf"))
            weights = torch.softmax(logits, dim=-1)
            weights = torch.nan_to_num(weights, nan=0.0)  # rows with no allowed key
            out[b, h * group : (h + 1) * group, q0:q1] = torch.matmul(weights, v.float()).to(out.dtype)
    return out


def window_attention_reference(
    window_queries: torch.Tensor,
    window_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of a few observation queries over dense padded candidate keys (never T x T).

    window_queries:   (B, H_q, w, d) post-RoPE
    window_positions: (B, w) positions of the window queries
    keys:             (B, H_kv, T, d) candidate keys (padded per head)
    key_positions:    (B, H_kv, T) positions, -1 for padding slots
    returns:          (B, H_q, w, T) float32 attention weights; disallowed keys get 0
    """
    batch, num_q_heads, w, d = window_queries.shape
    num_kv_heads = keys.shape[1]
    group = num_q_heads // num_kv_heads
    q = window_queries.float().reshape(batch, num_kv_heads, group * w, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # (B, H_kv, G*w, T)
    logits = logits.reshape(batch, num_kv_heads, group, w, -1)
    qpos = window_positions[:, None, None, :, None]
    kpos = key_positions[:, :, None, None, :]
    allowed = (kpos >= 0) & (kpos <= qpos)
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return weights.reshape(batch, num_q_heads, w, -1)


def column_max_logits_reference(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    query_block: int = 256,
) -> torch.Tensor:
    """Column max of pre-softmax logits over a set of queries and over the GQA group (Locret's CIS label).

    queries:         (B, H_q, n, d) post-RoPE queries (e.g. the response tokens)
    query_positions: (B, n) positions; a query only sees keys with position ``<=`` its own; -1 = ignored query
    keys:            (B, H_kv, T, d) post-RoPE keys
    key_positions:   (B, H_kv, T) or (B, T) positions, -1 = padding
    returns:         (B, H_kv, T) float32: ``max_{i, g in G(h)} q_i . k_j * scale``; ``-inf`` where no query sees j

    Computed in query blocks so memory is ``O(block * T)``, never ``T x T``.
    """
    batch, num_q_heads, n, d = queries.shape
    num_kv_heads, t = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    if key_positions.dim() == 2:
        key_positions = key_positions[:, None, :].expand(batch, num_kv_heads, t)
    result = torch.full((batch, num_kv_heads, t), float("-inf"), device=keys.device)
    k = keys.float()
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        q = queries[:, :, q0:q1].float().reshape(batch, num_kv_heads, group, q1 - q0, d)
        logits = torch.einsum("bhgqd,bhtd->bhgqt", q, k) * scale
        qpos = query_positions[:, None, None, q0:q1, None]
        kpos = key_positions[:, :, None, None, :]
        allowed = (kpos >= 0) & (qpos >= 0) & (kpos <= qpos)
        logits = logits.masked_fill(~allowed, float("-inf"))
        result = torch.maximum(result, logits.amax(dim=(2, 3)))
    return result
