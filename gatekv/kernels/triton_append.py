"""Triton append: write q new tokens after each segment's filled slots, in place (integer views, bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatekv.kernels import checks, reference
from gatekv.kernels.triton_common import INT_OF_SIZE, feature_block, require_kernel_device

__all__ = ["append"]


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
        HAS_B=has_b, BLOCK_Q=block_q, BLOCK_FA=feature_block(a_dst.shape[1]),
        BLOCK_FB=feature_block(b_dst.shape[1]), num_warps=4,
    )


def append(
    dst: list[torch.Tensor], starts: torch.Tensor, lengths: torch.Tensor, new: list[torch.Tensor], *,
    validate: bool = True,
) -> None:
    """Write new tokens at the end of each segment, in place (see ``reference.append_reference``).

    dst:     list of flat buffers (N_cap, *feature); the caller guarantees ``lengths + q <= caps``
    starts:  (S,) first row of each segment
    lengths: (S,) filled slots of each segment before the append (not modified)
    new:     list of tensors (S, q, *feature); converted to the buffer's dtype as the reference does
    """
    if validate:
        checks.check_append(dst, starts, lengths, new)
    device = dst[0].device
    require_kernel_device(device, "dst")
    num_segments, num_new = new[0].shape[:2]
    if num_segments == 0 or num_new == 0:
        return
    starts = starts.to(device=device, dtype=torch.int64)
    lengths = lengths.to(device=device, dtype=torch.int64)
    movable = []
    for buf, tokens in zip(dst, new):
        tokens = tokens.to(buf.dtype)  # conversion by torch (round to nearest even), then a bit-exact copy
        rows = _writable_rows(buf)
        if rows is None or buf.element_size() not in INT_OF_SIZE:
            reference.append_reference([buf], starts, lengths, [tokens])
            continue
        if rows.shape[1] == 0:
            continue
        as_int = tokens.view(INT_OF_SIZE[buf.element_size()])
        movable.append((rows, as_int.reshape(num_segments, num_new, rows.shape[1])))
    block_q = min(triton.next_power_of_2(num_new), 64)
    for p in range(0, len(movable), 2):
        pair = movable[p : p + 2]
        _launch_append([m[0] for m in pair], [m[1] for m in pair], starts, lengths, block_q)


def _writable_rows(buf: torch.Tensor) -> torch.Tensor | None:
    """``buf`` (N, *feature) as an integer *view* (N, F), or None when the features cannot be flattened in place."""
    if buf.element_size() not in INT_OF_SIZE:
        return None
    flat = buf.view(INT_OF_SIZE[buf.element_size()])
    if flat.dim() == 1:
        return flat.unsqueeze(1)
    try:
        return flat.view(flat.shape[0], -1)
    except RuntimeError:
        return None
