"""Triton observation-window attention: softmax of w queries over dense padded keys in two passes over T
(row max and sum per key chunk, then normalised weights), O(B * H_q * w * splits) extra memory.
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
    kernel_device,
    num_programs_wanted,
    row_block,
    row_offsets,
    segment_rows,
)

__all__ = ["window_attention"]


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
def _load_window_queries(q_ptr, qpos_ptr, b, head, qi, row_ok, dk, head_dim,
                         stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt, DOT_FP32: tl.constexpr):
    q = tl.load(q_ptr + row_offsets(b, head, qi, stride_qb, stride_qh, stride_qt) + dk[None, :] * stride_qd,
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
    b, h, n_rows, rows, row_ok, head, qi = segment_rows(bh, tl.program_id(2), num_kv_heads, group, w, BLOCK_M)
    dk = tl.arange(0, BLOCK_DK)
    q, qpos = _load_window_queries(q_ptr, qpos_ptr, b, head, qi, row_ok, dk, head_dim,
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
    b, h, n_rows, rows, row_ok, head, qi = segment_rows(bh, tl.program_id(2), num_kv_heads, group, w, BLOCK_M)
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
    q, qpos = _load_window_queries(q_ptr, qpos_ptr, b, head, qi, row_ok, dk, head_dim,
                                   stride_qb, stride_qh, stride_qt, stride_qd, stride_pb, stride_pt, DOT_FP32)
    key_base = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    kpos_base = b.to(tl.int64) * stride_kpb + h.to(tl.int64) * stride_kph
    ts = key_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = ts < num_keys
    s = _window_logits(q, qpos, k_ptr, kpos_ptr, key_base, kpos_base, stride_kt, stride_kd, stride_kpt,
                       ts, t_ok, dk, head_dim, scale_log2, DOT_FP32)
    weights = tl.exp2(s - m_safe[:, None]) * inv_l[:, None]
    o_off = row_offsets(b, head, qi, stride_ob, stride_oh, stride_ot)
    tl.store(out_ptr + o_off + ts[None, :] * stride_ok, weights, mask=row_ok[:, None] & t_ok[None, :])


def _launch_window_attention(window_queries, window_positions, keys, key_positions, out, scale: float,
                             num_splits: int, block_t: int) -> None:
    batch, num_q_heads, w, head_dim = window_queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_q_heads // num_kv_heads
    n_rows = group * w
    block_m = row_block(n_rows)
    row_blocks = triton.cdiv(n_rows, block_m)
    block_dk = dim_block(head_dim)
    part_m = torch.empty((batch * num_kv_heads, num_splits, n_rows), dtype=torch.float32, device=out.device)
    part_l = torch.empty_like(part_m)
    common = (
        window_queries, *window_queries.stride(),
        window_positions, *window_positions.stride(),
        keys, *keys.stride(),
        key_positions, *key_positions.stride(),
        part_m, part_l,
    )
    sizes = (num_kv_heads, group, w, num_keys, head_dim, num_splits, float(scale) * LOG2E)
    meta = dict(DOT_FP32=dot_in_fp32(window_queries, keys), BLOCK_M=block_m, BLOCK_T=block_t,
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
    validate: bool = True,
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
    if validate:
        checks.check_window_attention(window_queries, window_positions, keys, key_positions, scale)
    device = kernel_device("keys", keys, window_queries=window_queries, keys=keys)
    batch, num_q_heads, w, _ = window_queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    out = torch.empty((batch, num_q_heads, w, num_keys), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    block_t = default_block(block_t, 64, 256, "block_t")
    if num_splits is None:
        group = num_q_heads // num_kv_heads
        row_blocks = triton.cdiv(group * w, row_block(group * w))
        wanted = triton.cdiv(num_programs_wanted(device), batch * num_kv_heads * row_blocks)
        num_splits = max(1, min(wanted, triton.cdiv(num_keys, 1024)))
    check_splits(num_splits)
    _launch_window_attention(window_queries, window_positions.to(device), keys, key_positions.to(device), out,
                             scale, num_splits, block_t)
    return out
