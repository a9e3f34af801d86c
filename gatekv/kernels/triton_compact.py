"""Triton compaction: gather the kept slots of every segment into new flat buffers, two buffers per launch,
bit for bit (integer views), writing the fill value into each segment's growth room in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatekv.kernels import checks, reference
from gatekv.kernels.triton_common import (
    INT_OF_SIZE,
    as_int_rows,
    default_block,
    feature_block,
    in_pairs,
    int64_on,
    kernel_device,
)

__all__ = ["compact"]


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


def _launch_compact(pair, has_b: bool, src_starts, indices, counts, dst_starts, dst_ends, fill_growth: bool,
                    block_k: int) -> None:
    """One launch moving one or two buffers. pair: two (src, dst, fill) of (N, F) integer views and a (1,) fill
    tensor (``in_pairs``); the second is moved only when ``has_b``."""
    num_segments, k_max = indices.shape
    (a_src, a_dst, a_fill), (b_src, b_dst, b_fill) = pair
    grid = (num_segments, max(1, triton.cdiv(k_max, block_k)))
    _compact_kernel[grid](
        a_src, a_src.stride(0), a_src.stride(1), a_dst, a_dst.stride(0), a_dst.stride(1), a_fill, a_src.shape[1],
        b_src, b_src.stride(0), b_src.stride(1), b_dst, b_dst.stride(0), b_dst.stride(1), b_fill, b_src.shape[1],
        src_starts, indices, indices.stride(0), indices.stride(1), counts, dst_starts, dst_ends,
        HAS_B=has_b, FILL_GROWTH=fill_growth,
        BLOCK_K=block_k, BLOCK_FA=feature_block(a_src.shape[1]), BLOCK_FB=feature_block(b_src.shape[1]),
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
    validate: bool = True,
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
    if validate:
        checks.check_compact(src, src_starts, indices, counts, dst_starts, dst_rows, fill)
    device = kernel_device("src", src[0])
    dst_rows = int(dst_rows)
    fills = [0] * len(src) if fill is None else list(fill)
    fill_values = [torch.full((1,), value, dtype=buf.dtype, device=device) for buf, value in zip(src, fills)]
    num_segments = indices.shape[0]
    if num_segments == 0 or dst_rows == 0:
        return [torch.full((dst_rows, *buf.shape[1:]), value, dtype=buf.dtype, device=device)
                for buf, value in zip(src, fills)]
    src_starts, dst_starts, counts = int64_on(device, src_starts, dst_starts, counts)
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
        if buf.element_size() not in INT_OF_SIZE:  # e.g. complex128: no integer type of that width
            out.copy_(_compact_one_reference(buf, src_starts, indices, counts, dst_starts, dst_rows, fills[i]))
            continue
        movable.append((as_int_rows(buf), as_int_rows(out), fill_values[i].view(INT_OF_SIZE[buf.element_size()])))
    block_k = default_block(block_k, 64, 256, "block_k")
    for pair, has_b in in_pairs(movable):
        _launch_compact(pair, has_b, src_starts, indices, counts, dst_starts, dst_ends, ordered, block_k)
    return outs


def _compact_one_reference(buf, src_starts, indices, counts, dst_starts, dst_rows, value):
    return reference.compact_reference([buf], src_starts, indices, counts, dst_starts, dst_rows, [value])[0]
