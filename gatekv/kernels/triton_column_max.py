"""Triton column max of pre-softmax logits over the queries and the GQA group: each program holds one key
block in registers and streams every query row past it (no memory beyond the output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatekv.kernels import checks
from gatekv.kernels.triton_common import default_block, dim_block, dot_in_fp32, kernel_device, row_block

__all__ = ["column_max_logits"]


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
    block_m = row_block(group * num_queries)
    block_dk = dim_block(head_dim)
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
        DOT_FP32=dot_in_fp32(queries, keys), BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_DK=block_dk, num_warps=4,
    )


def column_max_logits(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    scale: float,
    *,
    block_t: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Column max of pre-softmax logits over queries and the GQA group (see ``reference.column_max_logits_reference``).

    queries:         (B, H_q, n, d); query_positions (B, n), -1 = ignored query
    keys:            (B, H_kv, T, d); key_positions (B, H_kv, T) or (B, T), -1 = padding
    block_t:         keys per program (a power of two >= 16; default 64, 512 under the interpreter)
    returns:         (B, H_kv, T) float32; -inf where no query sees the key

    Memory beyond the output: none (each program keeps one key block and streams the queries), so T = 100K is
    as cheap per key as T = 1K.
    """
    if validate:
        checks.check_column_max_logits(queries, query_positions, keys, key_positions, scale)
    device = kernel_device("keys", keys, queries=queries, keys=keys)
    batch, num_kv_heads, num_keys = keys.shape[:3]
    out = torch.empty((batch, num_kv_heads, num_keys), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out
    if queries.shape[2] == 0:
        return out.fill_(float("-inf"))
    block_t = default_block(block_t, 64, 512, "block_t")
    _launch_column_max(queries, query_positions.to(device), keys, key_positions.to(device), out, scale, block_t)
    return out
