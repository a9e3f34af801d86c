"""Triton ragged GQA attention for decode and short chunks: one program reads a segment's keys once for its
whole query group; split-K over key chunks with a log-sum-exp combine, no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatekv.kernels import checks
from gatekv.kernels.triton_common import (
    LOG2E,
    check_splits,
    default_block,
    dim_block,
    dot_in_fp32,
    int64_on,
    kernel_device,
    num_programs_wanted,
    row_block,
    row_offsets,
    segment_rows,
)

__all__ = ["ragged_attention"]


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
    b, h, n_rows, rows, row_ok, head, qi = segment_rows(seg, tl.program_id(2), num_kv_heads, group, q_len, BLOCK_M)
    length = tl.load(lengths_ptr + seg).to(tl.int32)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T, BLOCK_T)
    t_lo = split * chunk
    if SPLIT:
        if t_lo >= length:  # the combine step reads only the chunks that hold keys
            return
    t_hi = tl.minimum(length, t_lo + chunk)

    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q_off = row_offsets(b, head, qi, stride_qb, stride_qh, stride_qt)
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
        o_off = row_offsets(b, head, qi, stride_ob, stride_oh, stride_ot)
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
    b, h, n_rows, rows, row_ok, head, qi = segment_rows(seg, tl.program_id(1), num_kv_heads, group, q_len, BLOCK_M)
    length = tl.load(lengths_ptr + seg).to(tl.int32)
    chunk = tl.maximum(tl.cdiv(tl.cdiv(length, num_splits), BLOCK_T) * BLOCK_T, BLOCK_T)
    used = tl.cdiv(length, chunk)
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
    o_off = row_offsets(b, head, qi, stride_ob, stride_oh, stride_ot)
    tl.store(out_ptr + o_off + dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)


def _default_splits(cap_rows: int, num_segments: int, row_blocks: int, n_rows: int, value_dim: int,
                    device: torch.device) -> int:
    """Key chunks per segment, chosen without reading ``lengths`` (no host synchronisation).

    Each segment's keys are cut into ``splits`` chunks of its own length, so long and short segments both finish
    in about ``length / splits`` steps; chunks past a short segment's end exit at once.
    """
    wanted = triton.cdiv(num_programs_wanted(device), max(num_segments * row_blocks, 1))
    by_length = triton.cdiv(max(cap_rows, 1), 256)  # no segment is longer than the whole buffer
    by_memory = max(1, (1 << 24) // max(num_segments * n_rows * max(value_dim, 1), 1))  # partials <= 64 MiB
    return max(1, min(wanted, by_length, by_memory, 128))


def _launch_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, out,
                             scale: float, sliding_window: int | None, num_splits: int, block_t: int) -> None:
    batch, num_q_heads, q_len, head_dim = query.shape
    num_segments = starts.shape[0]
    num_kv_heads = num_segments // batch
    group = num_q_heads // num_kv_heads
    value_dim = values.shape[1]
    n_rows = group * q_len
    block_m = row_block(n_rows)
    row_blocks = triton.cdiv(n_rows, block_m)
    split = num_splits > 1
    if split:
        part_o = torch.empty((num_segments, num_splits, n_rows, value_dim), dtype=torch.float32, device=out.device)
        part_m = torch.empty((num_segments, num_splits, n_rows), dtype=torch.float32, device=out.device)
        part_l = torch.empty_like(part_m)
    else:
        part_o = part_m = part_l = out  # unused
    block_dk, block_dv = dim_block(head_dim), dim_block(value_dim)
    _ragged_attention_kernel[(num_segments, num_splits, row_blocks)](
        query, *query.stride(),
        query_positions, *query_positions.stride(),
        keys, *keys.stride(),
        values, *values.stride(),
        positions, positions.stride(0),
        starts, lengths,
        out, *out.stride(),
        part_o, part_m, part_l,
        num_kv_heads, group, q_len, head_dim, value_dim, num_splits, float(scale) * LOG2E,
        int(sliding_window) if sliding_window is not None else 0,
        HAS_WINDOW=sliding_window is not None, SPLIT=split, DOT_FP32=dot_in_fp32(query, keys, values),
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
    validate: bool = True,
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
    if validate:
        checks.check_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, scale, sliding_window)
    device = kernel_device("query", query, query=query, keys=keys, values=values)
    batch, num_q_heads, q_len, _ = query.shape
    out = torch.empty((batch, num_q_heads, q_len, values.shape[1]), dtype=query.dtype, device=device)
    if out.numel() == 0:
        return out
    num_segments = starts.shape[0]
    starts, lengths = int64_on(device, starts, lengths)
    query_positions = query_positions.to(device=device)
    n_rows = (num_q_heads // (num_segments // batch)) * q_len
    if num_splits is None:
        row_blocks = triton.cdiv(n_rows, row_block(n_rows))
        num_splits = _default_splits(keys.shape[0], num_segments, row_blocks, n_rows, values.shape[1], device)
    check_splits(num_splits)
    block_t = default_block(block_t, 64, 256, "block_t")
    _launch_ragged_attention(query, query_positions, keys, values, positions, starts, lengths, out, scale,
                             sliding_window, num_splits, block_t)
    return out
