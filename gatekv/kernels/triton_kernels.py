"""Triton kernels for the ragged KV cache: compaction, append, ragged GQA attention, window reductions.

Every public function here has the signature of its PyTorch reference in ``reference.py`` (plus keyword-only
tuning knobs) and returns the same data (data movement: bit for bit) or the same values within the tolerances
stated in ``tests/kernels`` (arithmetic). The storage layout is described in ``reference.py``.

Layers, per kernel: a private ``_name_kernel`` (``@triton.jit``), a launch wrapper ``_launch_name`` (views,
block sizes, grid) and the public function (validation, output allocation).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors through
Triton's interpreter; all arithmetic is then done in fp32, because the interpreter computes bf16 arithmetic on
the raw bit patterns. Without the interpreter every tensor must be on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from gatekv.kernels import reference
from gatekv.kernels.dispatch import (
    _check_append,
    _check_column_max_logits,
    _check_compact,
    _check_merge,
    _check_ragged_attention,
    _check_window_attention,
)

__all__ = ["append", "column_max_logits", "compact", "merge", "ragged_attention", "window_attention"]

_LOG2E = 1.4426950408889634
# Bit-exact copies: every buffer is moved as an integer type of the same width.
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------------------------
# compact: gather the kept slots of every segment
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _copy_rows(src_ptr, stride_src_row, stride_src_col, dst_ptr, stride_dst_row, stride_dst_col,
               num_cols, src_rows, dst_rows, row_mask, BLOCK_F: tl.constexpr):
    """Copy ``num_cols`` features of rows ``src_rows`` (BLOCK_R,) to ``dst_rows`` (BLOCK_R,)."""
    for f0 in range(0, num_cols, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = row_mask[:, None] & (cols < num_cols)[None, :]
        tile = tl.load(src_ptr + src_rows[:, None] * stride_src_row + cols[None, :] * stride_src_col, mask=mask)
        tl.store(dst_ptr + dst_rows[:, None] * stride_dst_row + cols[None, :] * stride_dst_col, tile, mask=mask)


@triton.jit
def _fill_rows(dst_ptr, stride_dst_row, stride_dst_col, num_cols, fill_ptr, row_lo, row_hi, first, step,
               BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Write the fill value (one element at ``fill_ptr``) into rows ``[row_lo, row_hi)``.

    This program takes the row blocks starting at ``row_lo + first``, ``row_lo + first + step``, ...
    """
    fill = tl.load(fill_ptr)
    for r0 in range(row_lo + first, row_hi, step):
        rows = r0 + tl.arange(0, BLOCK_R)
        for f0 in range(0, num_cols, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            mask = (rows < row_hi)[:, None] & (cols < num_cols)[None, :]
            tl.store(dst_ptr + rows[:, None] * stride_dst_row + cols[None, :] * stride_dst_col, fill, mask=mask)


@triton.jit
def _compact_kernel(
    src_a_ptr, stride_sa_row, stride_sa_col, dst_a_ptr, stride_da_row, stride_da_col, fill_a_ptr, cols_a,
    src_b_ptr, stride_sb_row, stride_sb_col, dst_b_ptr, stride_db_row, stride_db_col, fill_b_ptr, cols_b,
    src_starts_ptr, indices_ptr, stride_idx_seg, stride_idx_rank, counts_ptr, dst_starts_ptr, dst_ends_ptr,
    HAS_B: tl.constexpr, FILL_GROWTH: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_FA: tl.constexpr, BLOCK_FB: tl.constexpr,
):
    """Program (segment, rank block): copy kept slots ``indices[seg, ranks]`` of buffers A and B.

    With FILL_GROWTH, the programs of a segment also write the fill value into its growth room
    ``[dst_starts + counts, dst_ends)`` (round robin over the rank blocks).
    """
    seg = tl.program_id(0)
    block = tl.program_id(1)
    num_blocks = tl.num_programs(1)
    count = tl.load(counts_ptr + seg).to(tl.int64)
    src_start = tl.load(src_starts_ptr + seg).to(tl.int64)
    dst_start = tl.load(dst_starts_ptr + seg).to(tl.int64)
    ranks = block * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = ranks < count
    slots = tl.load(indices_ptr + seg.to(tl.int64) * stride_idx_seg + ranks * stride_idx_rank, mask=keep, other=0)
    src_rows = src_start + slots.to(tl.int64)
    dst_rows = dst_start + ranks
    _copy_rows(src_a_ptr, stride_sa_row, stride_sa_col, dst_a_ptr, stride_da_row, stride_da_col, cols_a,
               src_rows, dst_rows, keep, BLOCK_FA)
    if HAS_B:
        _copy_rows(src_b_ptr, stride_sb_row, stride_sb_col, dst_b_ptr, stride_db_row, stride_db_col, cols_b,
                   src_rows, dst_rows, keep, BLOCK_FB)
    if FILL_GROWTH:
        dst_end = tl.load(dst_ends_ptr + seg).to(tl.int64)
        _fill_rows(dst_a_ptr, stride_da_row, stride_da_col, cols_a, fill_a_ptr, dst_start + count, dst_end,
                   block * BLOCK_K, num_blocks * BLOCK_K, BLOCK_K, BLOCK_FA)
        if HAS_B:
            _fill_rows(dst_b_ptr, stride_db_row, stride_db_col, cols_b, fill_b_ptr, dst_start + count, dst_end,
                       block * BLOCK_K, num_blocks * BLOCK_K, BLOCK_K, BLOCK_FB)


def _as_int_rows(buf: torch.Tensor) -> torch.Tensor:
    """``buf`` (N, *feature) as an integer tensor (N, F) of the same element width (a view where possible)."""
    flat = buf.view(_INT_OF_SIZE[buf.element_size()])
    if flat.dim() == 1:
        return flat.unsqueeze(1)
    if flat.dim() == 2:
        return flat
    return flat.reshape(flat.shape[0], -1)


def _feature_block(num_cols: int) -> int:
    return min(triton.next_power_of_2(max(num_cols, 1)), 256)


def _launch_compact(pair_src, pair_dst, pair_fill, src_starts, indices, counts, dst_starts, dst_ends,
                    fill_growth: bool, block_k: int) -> None:
    """One launch moving one or two buffers. pair_*: lists of 1 or 2 (N, F) integer views / (1,) fill tensors."""
    num_segments, k_max = indices.shape
    a_src, a_dst, a_fill = pair_src[0], pair_dst[0], pair_fill[0]
    has_b = len(pair_src) == 2
    b_src, b_dst, b_fill = (pair_src[1], pair_dst[1], pair_fill[1]) if has_b else (a_src, a_dst, a_fill)
    grid = (num_segments, max(1, triton.cdiv(k_max, block_k)))
    _compact_kernel[grid](
        a_src, a_src.stride(0), a_src.stride(1), a_dst, a_dst.stride(0), a_dst.stride(1), a_fill, a_src.shape[1],
        b_src, b_src.stride(0), b_src.stride(1), b_dst, b_dst.stride(0), b_dst.stride(1), b_fill, b_src.shape[1],
        src_starts, indices, indices.stride(0), indices.stride(1), counts, dst_starts, dst_ends,
        HAS_B=has_b, FILL_GROWTH=fill_growth,
        BLOCK_K=block_k, BLOCK_FA=_feature_block(a_src.shape[1]), BLOCK_FB=_feature_block(b_src.shape[1]),
        num_warps=4,
    )


def compact(
    src: list[torch.Tensor],
    src_starts: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    dst_starts: torch.Tensor,
    dst_rows: int,
    fill: list[float | int] | None = None,
    *,
    block_k: int | None = None,
) -> list[torch.Tensor]:
    """Gather the kept slots of every segment into new flat buffers (see ``reference.compact_reference``).

    src:        list of flat buffers, each (N_src, *feature), any dtype; moved two per launch (keys and values
                together), bit for bit
    src_starts: (S,) first row of each segment in ``src``
    indices:    (S, K_max) slot indices within the segment; entries at ranks ``>= counts`` are ignored
    counts:     (S,) kept slots per segment
    dst_starts: (S,) first output row of each segment
    dst_rows:   total output rows
    fill:       value of output rows that receive no token, one per buffer (default 0)
    block_k:    kept slots per program (a power of two >= 16; default 64, 256 under the interpreter)
    returns:    list of flat buffers (dst_rows, *feature)

    When ``dst_starts`` is laid out in order (``dst_starts[0] == 0``, non-decreasing, ``<= dst_rows``) the kernel
    also writes the fill value into each segment's growth room, so the output is written exactly once; otherwise
    the output is pre-filled first. Deciding which costs one host synchronisation.
    """
    _check_compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill)
    device = src[0].device
    _require_kernel_device(device, "src")
    dst_rows = int(dst_rows)
    fills = [0] * len(src) if fill is None else list(fill)
    fill_values = [torch.full((1,), value, dtype=buf.dtype, device=device) for buf, value in zip(src, fills)]
    num_segments = indices.shape[0]
    if num_segments == 0 or dst_rows == 0:
        return [torch.full((dst_rows, *buf.shape[1:]), value, dtype=buf.dtype, device=device)
                for buf, value in zip(src, fills)]
    src_starts = src_starts.to(device=device, dtype=torch.int64)
    dst_starts = dst_starts.to(device=device, dtype=torch.int64)
    counts = counts.to(device=device, dtype=torch.int64)
    indices = indices.to(device=device)
    dst_ends = torch.cat([dst_starts[1:], dst_starts.new_full((1,), dst_rows)])
    ordered = bool(((dst_starts[0] == 0) & (dst_ends >= dst_starts).all()).item())
    if ordered:
        outs = [torch.empty((dst_rows, *buf.shape[1:]), dtype=buf.dtype, device=device) for buf in src]
    else:
        outs = [torch.full((dst_rows, *buf.shape[1:]), value, dtype=buf.dtype, device=device)
                for buf, value in zip(src, fills)]
    movable = []
    for i, (buf, out) in enumerate(zip(src, outs)):
        if out.numel() == 0:
            continue
        if buf.element_size() not in _INT_OF_SIZE:  # e.g. complex128: no integer type of that width
            out.copy_(_compact_one_reference(buf, src_starts, indices, counts, dst_starts, dst_rows, fills[i]))
            continue
        movable.append((_as_int_rows(buf), _as_int_rows(out), fill_values[i].view(_INT_OF_SIZE[buf.element_size()])))
    block_k = _default_block(block_k, 64, 256, "block_k")
    for p in range(0, len(movable), 2):
        pair = movable[p : p + 2]
        _launch_compact([m[0] for m in pair], [m[1] for m in pair], [m[2] for m in pair],
                        src_starts, indices, counts, dst_starts, dst_ends, ordered, block_k)
    return outs


def _compact_one_reference(buf, src_starts, indices, counts, dst_starts, dst_rows, value):
    return reference.compact_reference([buf], src_starts, indices, counts, dst_starts, dst_rows, [value])[0]


# --------------------------------------------------------------------------------------------------------------
# append: write q new tokens after each segment's filled slots
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _append_kernel(
    new_a_ptr, stride_na_seg, stride_na_tok, stride_na_col, dst_a_ptr, stride_da_row, stride_da_col, cols_a,
    new_b_ptr, stride_nb_seg, stride_nb_tok, stride_nb_col, dst_b_ptr, stride_db_row, stride_db_col, cols_b,
    starts_ptr, lengths_ptr, num_new,
    HAS_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_FA: tl.constexpr, BLOCK_FB: tl.constexpr,
):
    """Program (segment, token block): token ``i`` of segment ``seg`` goes to row ``starts + lengths + i``."""
    seg = tl.program_id(0)
    block = tl.program_id(1)
    row0 = tl.load(starts_ptr + seg).to(tl.int64) + tl.load(lengths_ptr + seg).to(tl.int64)
    toks = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tok_mask = toks < num_new
    dst_rows = row0 + toks
    seg64 = seg.to(tl.int64)
    for f0 in range(0, cols_a, BLOCK_FA):
        cols = f0 + tl.arange(0, BLOCK_FA)
        mask = tok_mask[:, None] & (cols < cols_a)[None, :]
        tile = tl.load(new_a_ptr + seg64 * stride_na_seg + toks[:, None] * stride_na_tok
                       + cols[None, :] * stride_na_col, mask=mask)
        tl.store(dst_a_ptr + dst_rows[:, None] * stride_da_row + cols[None, :] * stride_da_col, tile, mask=mask)
    if HAS_B:
        for f0 in range(0, cols_b, BLOCK_FB):
            cols = f0 + tl.arange(0, BLOCK_FB)
            mask = tok_mask[:, None] & (cols < cols_b)[None, :]
            tile = tl.load(new_b_ptr + seg64 * stride_nb_seg + toks[:, None] * stride_nb_tok
                           + cols[None, :] * stride_nb_col, mask=mask)
            tl.store(dst_b_ptr + dst_rows[:, None] * stride_db_row + cols[None, :] * stride_db_col, tile, mask=mask)


def _launch_append(pair_dst, pair_new, starts, lengths, block_q: int) -> None:
    """pair_dst: 1 or 2 (N_cap, F) integer views; pair_new: matching (S, q, F) integer views."""
    num_segments, num_new = pair_new[0].shape[:2]
    a_dst, a_new = pair_dst[0], pair_new[0]
    has_b = len(pair_dst) == 2
    b_dst, b_new = (pair_dst[1], pair_new[1]) if has_b else (a_dst, a_new)
    grid = (num_segments, triton.cdiv(num_new, block_q))
    _append_kernel[grid](
        a_new, a_new.stride(0), a_new.stride(1), a_new.stride(2), a_dst, a_dst.stride(0), a_dst.stride(1),
        a_dst.shape[1],
        b_new, b_new.stride(0), b_new.stride(1), b_new.stride(2), b_dst, b_dst.stride(0), b_dst.stride(1),
        b_dst.shape[1],
        starts, lengths, num_new,
        HAS_B=has_b, BLOCK_Q=block_q, BLOCK_FA=_feature_block(a_dst.shape[1]),
        BLOCK_FB=_feature_block(b_dst.shape[1]), num_warps=4,
    )


def append(
    dst: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, new: list[torch.Tensor]
) -> None:
    """Write new tokens at the end of each segment, in place (see ``reference.append_reference``).

    dst:     list of flat buffers (N_cap, *feature); the caller guarantees ``lengths + q <= caps``
    starts:  (S,) first row of each segment
    lengths: (S,) filled slots of each segment before the append (not modified)
    new:     list of tensors (S, q, *feature); converted to the buffer's dtype as the reference does
    """
    _check_append(dst, starts, lengths, new)
    device = dst[0].device
    _require_kernel_device(device, "dst")
    num_segments, num_new = new[0].shape[:2]
    if num_segments == 0 or num_new == 0:
        return
    starts = starts.to(device=device, dtype=torch.int64)
    lengths = lengths.to(device=device, dtype=torch.int64)
    movable = []
    for buf, tokens in zip(dst, new):
        tokens = tokens.to(buf.dtype)  # conversion by torch (round to nearest even), then a bit-exact copy
        rows = _writable_rows(buf)
        if rows is None or buf.element_size() not in _INT_OF_SIZE:
            reference.append_reference([buf], starts, lengths, [tokens])
            continue
        if rows.shape[1] == 0:
            continue
        as_int = tokens.view(_INT_OF_SIZE[buf.element_size()])
        movable.append((rows, as_int.reshape(num_segments, num_new, rows.shape[1])))
    block_q = min(triton.next_power_of_2(num_new), 64)
    for p in range(0, len(movable), 2):
        pair = movable[p : p + 2]
        _launch_append([m[0] for m in pair], [m[1] for m in pair], starts, lengths, block_q)


def _writable_rows(buf: torch.Tensor) -> torch.Tensor | None:
    """``buf`` (N, *feature) as an integer *view* (N, F), or None when the features cannot be flattened in place."""
    if buf.element_size() not in _INT_OF_SIZE:
        return None
    flat = buf.view(_INT_OF_SIZE[buf.element_size()])
    if flat.dim() == 1:
        return flat.unsqueeze(1)
    try:
        return flat.view(flat.shape[0], -1)
    except RuntimeError:
        return None


# --------------------------------------------------------------------------------------------------------------
# ragged GQA attention (decode and short chunks), split-K with a log-sum-exp merge
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _ragged_attention_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    qpos_ptr, stride_pb, stride_pt,
    k_ptr, stride_kn, stride_kd,
    v_ptr, stride_vn, stride_vd,
    kpos_ptr, stride_kpos,
    starts_ptr, lengths_ptr,
    out_ptr, stride_ob, stride_oh, stride_ot, stride_od,
    part_o_ptr, part_m_ptr, part_l_ptr,
    num_kv_heads, group, q_len, head_dim, value_dim, num_splits, scale_log2, window,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Program (segment, split, row block): the G*q query rows of one (batch row, KV head) over one key chunk.

    Rows ``r = g * q_len + i`` are query head ``h * G + g``, query ``i``. Without SPLIT the normalised output is
    written; with SPLIT the unnormalised accumulator and the row max / sum (log2 domain) go to the partials.
    """
    seg = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    b = seg // num_kv_heads
    h = seg % num_kv_heads
    n_rows = group * q_len
    length = tl.load(lengths_ptr + seg).to(tl.int32)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T, BLOCK_T)
    t_lo = split * chunk
    if SPLIT:
        if t_lo >= length:  # the combine step reads only the chunks that hold keys
            return
    t_hi = tl.minimum(length, t_lo + chunk)

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    head = h * group + rows // q_len
    qi = rows % q_len
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q_off = b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh + qi[:, None] * stride_qt
    q = tl.load(q_ptr + q_off + dk[None, :] * stride_qd, mask=row_ok[:, None] & (dk < head_dim)[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qpos = tl.load(qpos_ptr + b.to(tl.int64) * stride_pb + qi * stride_pt, mask=row_ok, other=-1).to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < t_hi
        key_rows = start + ts
        k = tl.load(k_ptr + key_rows[:, None] * stride_kn + dk[None, :] * stride_kd,
                    mask=t_ok[:, None] & (dk < head_dim)[None, :], other=0.0)
        kpos = tl.load(kpos_ptr + key_rows * stride_kpos, mask=t_ok, other=-1).to(tl.int64)
        if DOT_FP32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        rel = qpos[:, None] - kpos[None, :]
        allowed = (kpos[None, :] >= 0) & (rel >= 0)
        if HAS_WINDOW:
            allowed = allowed & (rel < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + key_rows[:, None] * stride_vn + dv[None, :] * stride_vd,
                    mask=t_ok[:, None] & (dv < value_dim)[None, :], other=0.0)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if SPLIT:
        part_row = (seg.to(tl.int64) * num_splits + split) * n_rows + rows
        tl.store(part_m_ptr + part_row, m_i, mask=row_ok)
        tl.store(part_l_ptr + part_row, l_i, mask=row_ok)
        tl.store(part_o_ptr + part_row[:, None] * value_dim + dv[None, :], acc,
                 mask=row_ok[:, None] & (dv < value_dim)[None, :])
    else:
        denom = tl.where(l_i > 0.0, l_i, 1.0)  # a query with no allowed key returns zeros
        out = acc / denom[:, None]
        o_off = b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh + qi[:, None] * stride_ot
        tl.store(out_ptr + o_off + dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < value_dim)[None, :])


@triton.jit
def _ragged_attention_combine_kernel(
    part_o_ptr, part_m_ptr, part_l_ptr, lengths_ptr,
    out_ptr, stride_ob, stride_oh, stride_ot, stride_od,
    num_kv_heads, group, q_len, value_dim, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Program (segment, row block): log-sum-exp merge of the chunks that hold keys, then normalise."""
    seg = tl.program_id(0)
    row_block = tl.program_id(1)
    b = seg // num_kv_heads
    h = seg % num_kv_heads
    n_rows = group * q_len
    length = tl.load(lengths_ptr + seg).to(tl.int32)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T, BLOCK_T)
    used = tl.cdiv(length, chunk)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dv = tl.arange(0, BLOCK_DV)
    mask = row_ok[:, None] & (dv < value_dim)[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for split in range(0, used):
        part_row = (seg.to(tl.int64) * num_splits + split) * n_rows + rows
        m_j = tl.load(part_m_ptr + part_row, mask=row_ok, other=float("-inf"))
        l_j = tl.load(part_l_ptr + part_row, mask=row_ok, other=0.0)
        o_j = tl.load(part_o_ptr + part_row[:, None] * value_dim + dv[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, m_j)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_j - m_safe)
        l_i = l_i * alpha + l_j * beta
        acc = acc * alpha[:, None] + o_j * beta[:, None]
        m_i = m_new
    denom = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / denom[:, None]
    head = h * group + rows // q_len
    qi = rows % q_len
    o_off = b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh + qi[:, None] * stride_ot
    tl.store(out_ptr + o_off + dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)


_SM_COUNT: dict[int, int] = {}


def _num_programs_wanted(device: torch.device) -> int:
    """About four programs per streaming multiprocessor keep the GPU busy (one under the interpreter, where
    programs run one after the other)."""
    if _INTERPRETED or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def _default_splits(cap_rows: int, num_segments: int, row_blocks: int, n_rows: int, value_dim: int,
                    device: torch.device) -> int:
    """Key chunks per segment, chosen without reading ``lengths`` (no host synchronisation).

    Each segment's keys are cut into ``splits`` chunks of its own length, so long and short segments both finish
    in about ``length / splits`` steps; chunks past a short segment's end exit at once.
    """
    wanted = triton.cdiv(_num_programs_wanted(device), max(num_segments * row_blocks, 1))
    by_length = triton.cdiv(max(cap_rows, 1), 256)  # no segment is longer than the whole buffer
    by_memory = max(1, (1 << 24) // max(num_segments * n_rows * max(value_dim, 1), 1))  # partials <= 64 MiB
    return max(1, min(wanted, by_length, by_memory, 128))


def _dot_in_fp32(*tensors: torch.Tensor) -> bool:
    """fp32 tensor-core-free dots for fp32 inputs, mixed dtypes and the interpreter; native 16-bit dots otherwise."""
    dtypes = {t.dtype for t in tensors}
    return _INTERPRETED or len(dtypes) > 1 or not dtypes <= {torch.float16, torch.bfloat16}


def _launch_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, out,
                             scale: float, sliding_window: int | None, num_splits: int, block_t: int) -> None:
    batch, num_q_heads, q_len, head_dim = query.shape
    num_segments = starts.shape[0]
    num_kv_heads = num_segments // batch
    group = num_q_heads // num_kv_heads
    value_dim = values.shape[1]
    n_rows = group * q_len
    block_m = min(64, max(16, triton.next_power_of_2(n_rows)))
    row_blocks = triton.cdiv(n_rows, block_m)
    split = num_splits > 1
    if split:
        part_o = torch.empty((num_segments, num_splits, n_rows, value_dim), dtype=torch.float32, device=out.device)
        part_m = torch.empty((num_segments, num_splits, n_rows), dtype=torch.float32, device=out.device)
        part_l = torch.empty_like(part_m)
    else:
        part_o = part_m = part_l = out  # unused
    block_dk = max(16, triton.next_power_of_2(head_dim))
    block_dv = max(16, triton.next_power_of_2(value_dim))
    _ragged_attention_kernel[(num_segments, num_splits, row_blocks)](
        query, *query.stride(),
        query_positions, *query_positions.stride(),
        keys, *keys.stride(),
        values, *values.stride(),
        positions, positions.stride(0),
        starts, lengths,
        out, *out.stride(),
        part_o, part_m, part_l,
        num_kv_heads, group, q_len, head_dim, value_dim, num_splits, float(scale) * _LOG2E,
        int(sliding_window) if sliding_window is not None else 0,
        HAS_WINDOW=sliding_window is not None, SPLIT=split, DOT_FP32=_dot_in_fp32(query, keys, values),
        BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
        num_warps=4, num_stages=2,
    )
    if split:
        _ragged_attention_combine_kernel[(num_segments, row_blocks)](
            part_o, part_m, part_l, lengths,
            out, *out.stride(),
            num_kv_heads, group, q_len, value_dim, num_splits,
            BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_DV=block_dv, num_warps=4,
        )


def ragged_attention(
    query: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    num_splits: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of new queries over the ragged cache (see ``reference.ragged_attention_reference``).

    query:           (B, H_q, q, d) post-RoPE queries; head ``j`` reads KV head ``j // (H_q // H_kv)``
    query_positions: (B, q) position of each query
    keys, values:    (N_cap, d), (N_cap, d_v) flat storage; positions (N_cap,) with -1 = no token
    starts, lengths: (S,) with S = B * H_kv
    num_splits:      key chunks per segment (split-K); default: enough programs to fill the device
    block_t:         keys per inner step (a power of two >= 16; default 64, 256 under the interpreter)
    returns:         (B, H_q, q, d_v) in the query's dtype; a query with no allowed key gets zeros

    One program reads a segment's keys once for all G query heads and q queries of its group (rows are tiled by
    64 when G * q is larger). No host synchronisation.
    """
    _check_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window)
    _check_floats(query=query, keys=keys, values=values)
    device = query.device
    _require_kernel_device(device, "query")
    batch, num_q_heads, q_len, _ = query.shape
    out = torch.empty((batch, num_q_heads, q_len, values.shape[1]), dtype=query.dtype, device=device)
    if out.numel() == 0:
        return out
    num_segments = starts.shape[0]
    starts = starts.to(device=device, dtype=torch.int64)
    lengths = lengths.to(device=device, dtype=torch.int64)
    query_positions = query_positions.to(device=device)
    n_rows = (num_q_heads // (num_segments // batch)) * q_len
    if num_splits is None:
        row_blocks = triton.cdiv(n_rows, min(64, max(16, triton.next_power_of_2(n_rows))))
        num_splits = _default_splits(keys.shape[0], num_segments, row_blocks, n_rows, values.shape[1], device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    block_t = _default_block(block_t, 64, 256, "block_t")
    _launch_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, out, scale,
                             sliding_window, num_splits, block_t)
    return out


# --------------------------------------------------------------------------------------------------------------
# window attention: softmax of w observation queries over dense padded keys, in two passes over T
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _window_logits(q, qpos, k_ptr, kpos_ptr, key_base, kpos_base, stride_kt, stride_kd, stride_kpt, ts, t_ok,
                   dk, head_dim, scale_log2, DOT_FP32: tl.constexpr):
    """Masked logits (BLOCK_M, BLOCK_T) in the log2 domain; disallowed pairs are -inf."""
    k = tl.load(k_ptr + key_base + ts[:, None] * stride_kt + dk[None, :] * stride_kd,
                mask=t_ok[:, None] & (dk < head_dim)[None, :], other=0.0)
    kpos = tl.load(kpos_ptr + kpos_base + ts * stride_kpt, mask=t_ok, other=-1).to(tl.int64)
    if DOT_FP32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2
    allowed = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _load_window_queries(q_ptr, qpos_ptr, b, h, rows, row_ok, group, w, dk, head_dim,
                         stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt, DOT_FP32: tl.constexpr):
    head = h * group + rows // w
    qi = rows % w
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
                + qi[:, None] * stride_qt + dk[None, :] * stride_qd,
                mask=row_ok[:, None] & (dk < head_dim)[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qpos = tl.load(qpos_ptr + b.to(tl.int64) * stride_pb + qi * stride_pt, mask=row_ok, other=-1).to(tl.int64)
    return q, qpos


@triton.jit
def _window_lse_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    qpos_ptr, stride_pb, stride_pt,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    kpos_ptr, stride_kpb, stride_kph, stride_kpt,
    part_m_ptr, part_l_ptr,
    num_kv_heads, group, w, num_keys, head_dim, num_splits, scale_log2,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Program (b * H_kv + h, key chunk, row block): running max and sum of exp2 over one chunk of keys."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.program_id(2)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    n_rows = group * w
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dk = tl.arange(0, BLOCK_DK)
    q, qpos = _load_window_queries(q_ptr, qpos_ptr, b, h, rows, row_ok, group, w, dk, head_dim,
                                   stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt, DOT_FP32)
    key_base = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    kpos_base = b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph
    chunk = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_T) * BLOCK_T
    t_lo = split * chunk
    t_hi = tl.minimum(num_keys, t_lo + chunk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        s = _window_logits(q, qpos, k_ptr, kpos_ptr, key_base, kpos_base, stride_kt, stride_kd, stride_kpt,
                           ts, ts < t_hi, dk, head_dim, scale_log2, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    part_row = (bh.to(tl.int64) * num_splits + split) * n_rows + rows
    tl.store(part_m_ptr + part_row, m_i, mask=row_ok)
    tl.store(part_l_ptr + part_row, l_i, mask=row_ok)


@triton.jit
def _window_weights_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    qpos_ptr, stride_pb, stride_pt,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    kpos_ptr, stride_kpb, stride_kph, stride_kpt,
    part_m_ptr, part_l_ptr,
    out_ptr, stride_ob, stride_oh, stride_ot, stride_ok,
    num_kv_heads, group, w, num_keys, head_dim, num_splits, scale_log2,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Program (b * H_kv + h, key block, row block): merge the chunk statistics, write normalised weights."""
    bh = tl.program_id(0)
    key_block = tl.program_id(1)
    row_block = tl.program_id(2)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    n_rows = group * w
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for split in range(0, num_splits):
        part_row = (bh.to(tl.int64) * num_splits + split) * n_rows + rows
        m_j = tl.load(part_m_ptr + part_row, mask=row_ok, other=float("-inf"))
        l_j = tl.load(part_l_ptr + part_row, mask=row_ok, other=0.0)
        m_new = tl.maximum(m_i, m_j)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + l_j * tl.exp2(m_j - m_safe)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0.0, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), 0.0)

    dk = tl.arange(0, BLOCK_DK)
    q, qpos = _load_window_queries(q_ptr, qpos_ptr, b, h, rows, row_ok, group, w, dk, head_dim,
                                   stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt, DOT_FP32)
    key_base = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    kpos_base = b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph
    ts = key_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < num_keys
    s = _window_logits(q, qpos, k_ptr, kpos_ptr, key_base, kpos_base, stride_kt, stride_kd, stride_kpt,
                       ts, t_ok, dk, head_dim, scale_log2, DOT_FP32)
    weights = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
    head = h * group + rows // w
    qi = rows % w
    o_off = b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh + qi[:, None] * stride_ot
    tl.store(out_ptr + o_off + ts[None, :] * stride_ok, weights, mask=row_ok[:, None] & t_ok[None, :])


def _launch_window_attention(window_queries, window_positions, keys, key_positions, out, scale: float,
                             num_splits: int, block_t: int) -> None:
    batch, num_q_heads, w, head_dim = window_queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    n_rows = group * w
    block_m = min(64, max(16, triton.next_power_of_2(n_rows)))
    row_blocks = triton.cdiv(n_rows, block_m)
    block_dk = max(16, triton.next_power_of_2(head_dim))
    part_m = torch.empty((batch * num_kv_heads, num_splits, n_rows), dtype=torch.float32, device=out.device)
    part_l = torch.empty_like(part_m)
    common = (
        window_queries, *window_queries.stride(),
        window_positions, *window_positions.stride(),
        keys, *keys.stride(),
        key_positions, *key_positions.stride(),
        part_m, part_l,
    )
    sizes = (num_kv_heads, group, w, num_keys, head_dim, num_splits, float(scale) * _LOG2E)
    meta = dict(DOT_FP32=_dot_in_fp32(window_queries, keys), BLOCK_M=block_m, BLOCK_T=block_t,
                BLOCK_DK=block_dk, num_warps=4)
    _window_lse_kernel[(batch * num_kv_heads, num_splits, row_blocks)](*common, *sizes, **meta)
    _window_weights_kernel[(batch * num_kv_heads, triton.cdiv(num_keys, block_t), row_blocks)](
        *common, out, *out.stride(), *sizes, **meta
    )


def window_attention(
    window_queries: torch.Tensor,
    window_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_t: int | None = None,
) -> torch.Tensor:
    """Softmax attention of observation queries over dense padded keys (see ``reference.window_attention_reference``).

    window_queries:   (B, H_q, w, d) post-RoPE
    window_positions: (B, w)
    keys:             (B, H_kv, T, d); key_positions (B, H_kv, T), -1 for padding
    num_splits:       key chunks of the first pass (row max and sum); default: enough programs to fill the device
    block_t:          keys per program of the second pass (a power of two >= 16; default 64, 256 under the
                      interpreter)
    returns:          (B, H_q, w, T) float32 weights; disallowed keys get 0

    Memory beyond the output: O(B * H_q * w * num_splits).
    """
    _check_window_attention(window_queries, window_positions, keys, key_positions, scale)
    _check_floats(window_queries=window_queries, keys=keys)
    device = keys.device
    _require_kernel_device(device, "keys")
    batch, num_q_heads, w, _ = window_queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    out = torch.empty((batch, num_q_heads, w, num_keys), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    block_t = _default_block(block_t, 64, 256, "block_t")
    if num_splits is None:
        group = num_q_heads // num_kv_heads
        row_blocks = triton.cdiv(group * w, min(64, max(16, triton.next_power_of_2(group * w))))
        wanted = triton.cdiv(_num_programs_wanted(device), batch * num_kv_heads * row_blocks)
        num_splits = max(1, min(wanted, triton.cdiv(num_keys, 1024)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    _launch_window_attention(window_queries, window_positions.to(device), keys, key_positions.to(device), out,
                             scale, num_splits, block_t)
    return out


# --------------------------------------------------------------------------------------------------------------
# column max of pre-softmax logits over queries and the GQA group
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _column_max_kernel(
    q_ptr, stride_qb, stride_qh, stride_qt, stride_qd,
    qpos_ptr, stride_pb, stride_pt,
    k_ptr, stride_kb, stride_kh, stride_kt, stride_kd,
    kpos_ptr, stride_kpb, stride_kph, stride_kpt,
    out_ptr, stride_ob, stride_oh, stride_ot,
    num_kv_heads, group, num_queries, num_keys, head_dim, scale,
    DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_DK: tl.constexpr,
):
    """Program (b * H_kv + h, key block): keys stay in registers, all G * n query rows stream past them."""
    bh = tl.program_id(0)
    key_block = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    n_rows = group * num_queries
    ts = key_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < num_keys
    dk = tl.arange(0, BLOCK_DK)
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + ts[:, None] * stride_kt
                + dk[None, :] * stride_kd, mask=t_ok[:, None] & (dk < head_dim)[None, :], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
    kpos = tl.load(kpos_ptr + b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph + ts * stride_kpt,
                   mask=t_ok, other=-1).to(tl.int64)
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        head = h * group + rows // num_queries
        qi = rows % num_queries
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
                    + qi[:, None] * stride_qt + dk[None, :] * stride_qd,
                    mask=row_ok[:, None] & (dk < head_dim)[None, :], other=0.0)
        qpos = tl.load(qpos_ptr + b.to(tl.int64) * stride_pb + qi * stride_pt, mask=row_ok, other=-1).to(tl.int64)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        allowed = (kpos[None, :] >= 0) & (qpos[:, None] >= 0) & (kpos[None, :] <= qpos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        best = tl.maximum(best, tl.max(s, 0))
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + ts * stride_ot, best, mask=t_ok)


def _launch_column_max(queries, query_positions, keys, key_positions, out, scale: float, block_t: int) -> None:
    batch, num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    block_m = min(64, max(16, triton.next_power_of_2(group * num_queries)))
    block_dk = max(16, triton.next_power_of_2(head_dim))
    if key_positions.dim() == 2:  # (B, T) shared by every KV head
        kpos_strides = (key_positions.stride(0), 0, key_positions.stride(1))
    else:
        kpos_strides = key_positions.stride()
    _column_max_kernel[(batch * num_kv_heads, triton.cdiv(num_keys, block_t))](
        queries, *queries.stride(),
        query_positions, *query_positions.stride(),
        keys, *keys.stride(),
        key_positions, *kpos_strides,
        out, *out.stride(),
        num_kv_heads, group, num_queries, num_keys, head_dim, float(scale),
        DOT_FP32=_dot_in_fp32(queries, keys), BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_DK=block_dk, num_warps=4,
    )


def column_max_logits(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    *,
    block_t: int | None = None,
) -> torch.Tensor:
    """Column max of pre-softmax logits over queries and the GQA group (see ``reference.column_max_logits_reference``).

    queries:         (B, H_q, n, d); query_positions (B, n), -1 = ignored query
    keys:            (B, H_kv, T, d); key_positions (B, H_kv, T) or (B, T), -1 = padding
    block_t:         keys per program (a power of two >= 16; default 64, 512 under the interpreter)
    returns:         (B, H_kv, T) float32; -inf where no query sees the key

    Memory beyond the output: none (each program keeps one key block and streams the queries), so T = 100K is
    as cheap per key as T = 1K.
    """
    _check_column_max_logits(queries, query_positions, keys, key_positions, scale)
    _check_floats(queries=queries, keys=keys)
    device = keys.device
    _require_kernel_device(device, "keys")
    batch, num_kv_heads, num_keys = keys.shape[:3]
    out = torch.empty((batch, num_kv_heads, num_keys), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    if queries.shape[2] == 0:
        return out.fill_(float("-inf"))
    block_t = _default_block(block_t, 64, 512, "block_t")
    _launch_column_max(queries, query_positions.to(device), keys, key_positions.to(device), out, scale, block_t)
    return out


# --------------------------------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# merge: fold dropped tokens into kept ones of the compacted storage
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _merge_accumulate_kernel(
    src_ptr, stride_src_row, stride_src_col, acc_ptr, stride_acc_row, weight_sum_ptr, num_cols,
    src_starts_ptr, dst_starts_ptr, sources_ptr, targets_ptr, weights_ptr, stride_e_seg, counts_ptr,
    SUM_WEIGHTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Program (segment, source block): ``acc[dst row] += w_e * src[e]`` (fp32 atomics), and ``weight_sum += w_e``."""
    seg = tl.program_id(0)
    block = tl.program_id(1)
    count = tl.load(counts_ptr + seg)
    e = block * BLOCK_E + tl.arange(0, BLOCK_E)
    valid = e < count
    if block * BLOCK_E < count:
        src_row = tl.load(src_starts_ptr + seg) + tl.load(sources_ptr + seg * stride_e_seg + e, mask=valid, other=0)
        dst_row = tl.load(dst_starts_ptr + seg) + tl.load(targets_ptr + seg * stride_e_seg + e, mask=valid, other=0)
        w = tl.load(weights_ptr + seg * stride_e_seg + e, mask=valid, other=0.0).to(tl.float32)
        if SUM_WEIGHTS:
            tl.atomic_add(weight_sum_ptr + dst_row, w, mask=valid)
        for f0 in range(0, num_cols, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            mask = valid[:, None] & (cols < num_cols)[None, :]
            x = tl.load(src_ptr + src_row[:, None] * stride_src_row + cols[None, :] * stride_src_col, mask=mask, other=0.0)
            x = x.to(tl.float32)  # straight after the load (the interpreter's bf16 arithmetic is wrong)
            tl.atomic_add(acc_ptr + dst_row[:, None] * stride_acc_row + cols[None, :], x * w[:, None], mask=mask)


def _launch_merge_accumulate(src, acc, weight_sum, src_starts, dst_starts, sources, targets, weights, counts, sum_weights):
    num_segments, e_max = sources.shape
    flat_src = src.reshape(src.shape[0], -1)
    block_e = 16 if not _INTERPRETED else 64
    block_f = min(128, triton.next_power_of_2(max(flat_src.shape[1], 1)))
    grid = (num_segments, triton.cdiv(e_max, block_e))
    _merge_accumulate_kernel[grid](
        flat_src, flat_src.stride(0), flat_src.stride(1), acc, acc.stride(0), weight_sum, flat_src.shape[1],
        src_starts, dst_starts, sources, targets, weights, sources.stride(0), counts,
        SUM_WEIGHTS=sum_weights, BLOCK_E=block_e, BLOCK_F=block_f,
    )


def merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts) -> None:
    """Triton version of ``reference.merge_reference`` (in place). Sums run in fp32 with atomics, so the result
    matches the reference within fp32 rounding (the order of the additions is not fixed)."""
    _check_merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)
    if sources.shape[1] == 0 or dst[0].shape[0] == 0:
        return
    device = dst[0].device
    for name, buf in (("dst[0]", dst[0]), ("src[0]", src[0])):
        _require_kernel_device(buf.device, name)
    index = lambda t: t.to(device=device, dtype=torch.int64).contiguous()  # noqa: E731
    src_starts, dst_starts, sources, targets, counts = map(index, (src_starts, dst_starts, sources, targets, source_counts))
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    weight_sum = torch.zeros(dst[0].shape[0], dtype=torch.float32, device=device)
    for i, (out, buf) in enumerate(zip(dst, src)):
        acc = torch.zeros(out.shape[0], out[0].numel(), dtype=torch.float32, device=device)
        _launch_merge_accumulate(buf, acc, weight_sum, src_starts, dst_starts, sources, targets, weights, counts, i == 0)
        touched = (weight_sum > 0).nonzero().flatten()
        flat = out.reshape(out.shape[0], -1)
        merged = (flat[touched].float() + acc[touched]) / (1.0 + weight_sum[touched, None])
        flat[touched] = merged.to(out.dtype)


def _check_floats(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in _FLOATS:
            raise ValueError(f"{name} has dtype {tensor.dtype}; the Triton kernels take {[str(d) for d in _FLOATS]}")


def _default_block(value: int | None, compiled: int, interpreted: int, name: str) -> int:
    """A block size: the given one (checked), else the default. The interpreter's cost is per operation, not per
    element, so it gets larger blocks."""
    if value is None:
        return interpreted if _INTERPRETED else compiled
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
    return value


def _require_kernel_device(device: torch.device, name: str) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU (or CUDA) tensors."""
    if device.type == "cuda" or (_INTERPRETED and device.type == "cpu"):
        return
    raise ValueError(
        f"{name} is on {device}: the Triton kernels need CUDA tensors"
        + ("" if _INTERPRETED else " (or TRITON_INTERPRET=1 set before gatekv.kernels.triton_kernels is imported)")
    )


# Whether the kernels were decorated for Triton's CPU interpreter (TRITON_INTERPRET=1 at import time).
_INTERPRETED = isinstance(_compact_kernel, InterpretedFunction)
