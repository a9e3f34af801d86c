"""Fast PyTorch path for single-token decode over the ragged cache (CPU, or GPU without Triton).

When every filled slot holds a real token older than the query and no sliding window can cut in (the caller
knows this from the cache's bookkeeping), decode attention needs no position mask. Two layouts:

- *regular*: segment ``s`` starts at row ``s * c`` for one stride ``c`` (every segment of the layer has the same
  capacity, as after a uniform allocation): the flat buffers are viewed in place as dense ``(B, H_kv, L, d)``
  tensors (no copy) and one SDPA call with ``enable_gqa`` serves every row and head, as for a dense cache of
  ``L`` tokens; shorter segments are masked past their length.
- *flat*: segments of uneven lengths (a head-wise allocation such as Ada-KV) with few KV heads per row
  (``FLAT_MAX_HEADS``): per batch row, each KV head's query group attends over a window of the row's slots that
  holds its segment (strided views, one stride for all heads, so windows may overlap other heads' slots), masked by
  a :class:`FlatDecodeMask` (0 on the head's own filled slots, -inf elsewhere, kept up to date by the cache at
  each decode append): ``baddbmm``, softmax, ``bmm``. Up to ``H_kv`` times the dot products of the kept tokens
  when the heads' lengths differ a lot, but every key is read in place and three ops replace ``H_kv`` SDPA calls
  (on CPU each of those is single-threaded at one query and costs about what the floor's one call costs). The
  cache lays each row's segments out in the order of its heads that makes the windows shortest
  (:func:`flat_order`): as short as the longest segment when that is reachable;
- otherwise one SDPA call per segment, in which the ``G`` query heads of a GQA group act as ``G`` queries of one
  head, reading the segment's keys in place.

Equal to ``reference.ragged_attention_reference`` within the kernels' tolerances.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["FLAT_MAX_HEADS", "FlatDecodeMask", "flat_order", "ragged_attention_sdpa", "ragged_decode_unmasked",
           "regular_stride", "segments_view", "window_attention_torch", "window_in_order"]

FLAT_MAX_HEADS = 4
"""Most KV heads per row for the flat path: its matmuls may do up to ``H_kv`` times the needed dot products, which
on CPU costs less than ``H_kv`` single-query SDPA calls up to about this many heads."""


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


class FlatDecodeMask:
    """Additive mask of the flat decode path: per batch row ``b``, (H_kv, n_max) with 0 where slot ``lo_b + j`` holds
    a token of the segment and -inf elsewhere (other heads' slots, free room).

    ``lo_b``: the row's first slot; the range covers the row's segments with their room. The segments of a row lie one
    after another in any order of their heads (:func:`flat_order` picks it); mask row ``j`` belongs to the row's
    ``j``-th segment in memory, head ``order[b][j]``. Built by :meth:`build` from the layout; the owner (the cache
    layer) calls :meth:`fill` with the flat rows it writes at each decode append and drops the mask when the layout
    changes.
    """

    def __init__(self, bias: torch.Tensor, row_start: list[int], row_width: list[int], heads: int,
                 order: list[list[int]] | None = None):
        self.bias = bias  # (B, H_kv, n_max) float32, rows in memory order
        self.row_start = row_start  # per row, its first slot
        self.row_width = row_width  # per row, its slots (its segments' capacities)
        self.heads = heads
        batch, n_max = bias.shape[0], bias.shape[-1]
        identity = list(range(heads))
        self.order = [identity] * batch if order is None else [list(o) for o in order]
        # per row, the heads in memory order and back as index tensors (None: the row lies in head order)
        self.perm = [None if o == identity else torch.tensor(o, device=bias.device) for o in self.order]
        self.inverse = [None if p is None else torch.argsort(p) for p in self.perm]
        rank = torch.tensor([[o.index(h) for h in range(heads)] for o in self.order], device=bias.device).reshape(-1)
        segments = torch.arange(batch * heads, device=bias.device)
        lo = torch.tensor(row_start, device=bias.device, dtype=torch.long).repeat_interleave(heads)
        # flat index in ``bias`` of slot r of segment s: _base[s] + r
        self._base = (segments - segments % heads + rank) * n_max - lo

    @classmethod
    def build(cls, starts: torch.Tensor, caps: torch.Tensor, lengths: torch.Tensor, batch: int, heads: int,
              dtype: torch.dtype = torch.float32) -> "FlatDecodeMask":
        """The mask of a layout: starts/caps/lengths (S = B * H_kv,) int64, the segments of a row one after another
        (in any order of their heads)."""
        row_starts = starts.reshape(batch, heads)
        order = torch.argsort(row_starts, dim=-1, stable=True)  # (B, H_kv): the row's heads in memory order
        lo = row_starts.amin(-1)
        hi = (starts + caps).reshape(batch, heads).amax(-1)
        n_max = int((hi - lo).max().item())
        in_memory = (order + torch.arange(batch, device=starts.device)[:, None] * heads).reshape(-1)
        rel = lo.repeat_interleave(heads)[:, None] + torch.arange(n_max, device=starts.device) - starts[in_memory, None]
        allowed = (rel >= 0) & (rel < lengths[in_memory, None])  # (S, n_max), rows in memory order
        bias = torch.zeros(batch * heads, n_max, dtype=dtype, device=starts.device)
        bias.masked_fill_(~allowed, float("-inf"))
        return cls(bias.reshape(batch, heads, n_max), lo.tolist(), (hi - lo).tolist(), heads, order.tolist())

    def row_window(self, b: int, starts: list[int], lengths: list[int]) -> tuple[int, int]:
        """``(c, L)`` of row ``b``'s flat windows (:func:`_window`) for the segments' ``starts``/``lengths`` (S,)."""
        lo = self.row_start[b]
        segments = [b * self.heads + h for h in self.order[b]]  # memory order
        return _window([starts[s] - lo for s in segments], [starts[s] + lengths[s] - lo for s in segments],
                       self.row_width[b])

    def fill(self, rows: torch.Tensor) -> None:
        """Open one new slot per segment: ``rows`` (S,) the flat rows just written (segment order)."""
        self.bias.view(-1).index_fill_(0, self._base + rows, 0.0)


def _window(rel_starts: list[int], ends: list[int], width: int) -> tuple[int, int]:
    """The windows of the flat path: the ``h``-th segment of a row in memory is read in the ``L`` slots from ``h * c``
    (relative to the row's first slot). Each window must hold its segment (``h * c <= start_h``,
    ``end_h <= h * c + L``) and stay inside the row's ``width`` slots (``(H - 1) * c + L <= width``); the largest
    such ``c`` gives the shortest ``L`` (``c = 0``, ``L`` = the row's filled range, always fits). Returns ``(c, L)``."""
    heads = len(ends)
    c = min((rel_starts[h] // h for h in range(1, heads)), default=0)
    for k in range(heads - 1):
        c = min(c, (width - ends[k]) // (heads - 1 - k))
    c = max(c, 0)
    return c, max(ends[h] - h * c for h in range(heads))


def window_in_order(caps: list[int], lengths: list[int], order: list[int]) -> int:
    """The flat windows' length ``L`` (:func:`_window`) for one row whose segments (capacities ``caps``, ``lengths``,
    per head) lie one after another in ``order`` (the heads in memory order)."""
    starts = list(itertools.accumulate((caps[h] for h in order[:-1]), initial=0))
    return _window(starts, [s + lengths[h] for s, h in zip(starts, order)], sum(caps))[1]


def flat_order(caps: list[int], lengths: list[int], heads: int) -> list[int] | None:
    """The order in which to lay the segments out (a permutation of ``range(S)`` that keeps every row's segments
    together and the rows in order), or None for segment order.

    Within a row, the flat decode path reads every segment through a window as long as the longest one needs
    (:func:`_window`), and that depends on the order of the segments in memory: lengths (492, 985, 986) with 64 free
    slots each need windows of 1,479 slots in head order and of 986 (the longest segment, the least possible) in the
    order (986, 492, 985). Per row with ``2 <= heads <= FLAT_MAX_HEADS`` and uneven lengths, every order of its heads
    is tried (24 at most) and the shortest window kept (head order on ties).

    caps/lengths: per segment (S = B * heads), the capacities and the lengths to be laid out
    """
    if not 2 <= heads <= FLAT_MAX_HEADS or len(caps) % heads:
        return None
    order, moved = [], False
    for first in range(0, len(caps), heads):
        row_caps, row_lengths = caps[first:first + heads], lengths[first:first + heads]
        best, best_length = list(range(heads)), None
        if len(set(row_lengths)) > 1:
            for perm in itertools.permutations(range(heads)):
                length = window_in_order(row_caps, row_lengths, perm)
                if best_length is None or length < best_length:
                    best, best_length = list(perm), length
        moved = moved or best != list(range(heads))
        order.extend(first + h for h in best)
    return order if moved else None


def _decode_flat(query, keys, values, starts, lengths, scale, mask: FlatDecodeMask) -> torch.Tensor:
    """The flat path of :func:`ragged_decode_unmasked` (every segment holds >= 1 token).

    Per batch row, the ``j``-th segment in memory (KV head ``mask.order[b][j]``) is attended over a window of ``L``
    slots starting ``j * c`` slots into the row (strided views of the flat buffers and of the mask, no copy), chosen
    by :func:`_window` to hold the whole segment; slots of the window outside the segment are masked. Two batched
    matmuls over the ``H_kv`` windows and one softmax; the query groups are put in memory order first and the
    outputs back in head order (where the row's heads are not in head order).
    """
    batch, num_q_heads, _, head_dim = query.shape
    heads = mask.heads
    group = num_q_heads // heads
    dtype, out_dtype = keys.dtype, query.dtype
    if query.dtype != dtype:
        query = query.to(dtype)
    bias_all = mask.bias if mask.bias.dtype == dtype else mask.bias.to(dtype)
    n_max = bias_all.shape[-1]
    key_row, value_row, d_v = keys.stride(0), values.stride(0), values.shape[1]
    pieces = []
    for b in range(batch):
        lo = mask.row_start[b]
        c, length = mask.row_window(b, starts, lengths)
        k = keys.as_strided((heads, length, head_dim), (c * key_row, key_row, keys.stride(1)), keys.storage_offset() + lo * key_row)
        v = values.as_strided((heads, length, d_v), (c * value_row, value_row, values.stride(1)),
                              values.storage_offset() + lo * value_row)
        bias = bias_all.as_strided((heads, 1, length), (n_max + c, length, 1),
                                   bias_all.storage_offset() + b * heads * n_max)
        grouped = query[b].reshape(heads, group, head_dim)
        if mask.perm[b] is not None:
            grouped = grouped.index_select(0, mask.perm[b])
        logits = torch.baddbmm(bias, grouped, k.transpose(1, 2), alpha=scale)
        attended = torch.bmm(torch.softmax(logits, -1), v)  # (H_kv, G, d_v), memory order
        pieces.append(attended if mask.perm[b] is None else attended.index_select(0, mask.inverse[b]))
    out = pieces[0] if batch == 1 else torch.stack(pieces)
    return out.view(batch, num_q_heads, 1, d_v).to(out_dtype)


def ragged_decode_unmasked(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: list[int],
    lengths: list[int],
    scale: float,
    flat_mask: FlatDecodeMask | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per row over every filled slot of its segments.

    query:     (B, H_q, 1, d) post-RoPE
    keys:      (N_cap, d), values: (N_cap, d_v) flat storage; starts/lengths: per segment (S = B * H_kv) as lists
    flat_mask: the layout's :class:`FlatDecodeMask`, when the caller keeps one: an irregular layout then takes the
               flat path (if every segment holds a token and ``H_kv <= FLAT_MAX_HEADS``)
    returns:   (B, H_q, 1, d_v); a segment of length 0 gives zeros
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
    if flat_mask is not None and flat_mask.heads == num_kv_heads <= FLAT_MAX_HEADS and min(lengths) > 0:
        return _decode_flat(query, keys, values, starts, lengths, scale, flat_mask)
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


def window_attention_torch(window_queries, window_positions, keys, key_positions, scale) -> torch.Tensor:
    """``reference.window_attention_reference`` with fewer passes over the ``(B, H_q, w, T)`` logits (the CPU path
    of the observation-window attention that SnapKV, DefensiveKV, CAKE and ``defensive_budget`` read every layer):
    the scale goes on the ``w`` queries instead of the logits, and the mask touches only the columns that need it.
    Every slot before the first one that some window query may not see (a padding slot, a key after a query) is
    seen by every window query; in a prompt's own prefill that leaves the last ``w`` columns, masked in place, and
    no query without a key (so no NaN to clear). Otherwise (padding, holes, unsorted slots) the masked columns start
    at the first such slot, and NaN rows (queries that see no key: padding) are zeroed. Per SmolLM2 layer at 2K with
    w = 32 on 2 CPU threads: 0.66 ms against 0.80 ms for one ``where`` over every logit and 0.60 ms for the bare
    matmul + softmax (benchmarks/window_attention_cost.py, big allocations on the heap). Same arguments and result
    (float32, disallowed keys 0)."""
    batch, num_q_heads, w, d = window_queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    q = (window_queries.float() * scale).reshape(batch, num_kv_heads, group * w, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(batch, num_kv_heads, group, w, num_keys)
    # slots every window query of the row sees: a real token no later than the row's earliest window query
    earliest = window_positions.amin(-1)[:, None, None]  # (B, 1, 1); -1 if the row has a padding query
    seen_by_all = (key_positions >= 0) & (key_positions <= earliest)  # (B, H_kv, T)
    unseen = (~seen_by_all).reshape(-1, num_keys).any(0)
    first = int(unseen.to(torch.uint8).argmax()) if bool(unseen.any()) else num_keys
    if first < num_keys:
        kpos = key_positions[:, :, None, None, first:]
        allowed = (kpos >= 0) & (kpos <= window_positions[:, None, None, :, None])  # (B, H_kv, 1, w, T - first)
        logits[..., first:].masked_fill_(~allowed, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    if first == 0:  # some query may see no key at all (padding): its NaN row becomes zeros
        weights.nan_to_num_(nan=0.0)
    return weights.view(batch, num_q_heads, w, num_keys)
