"""Triton append: write q new tokens after each segment's filled slots, in place (integer views, bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatekv.kernels import checks, reference
from gatekv.kernels.triton_common import INT_OF_SIZE, feature_block, in_pairs, int64_on, kernel_device

__all__ = ["append"]


@triton.jit
def _copy_tokens(new_ptr, stride_tok, stride_col, dst_ptr, stride_row, stride_dst_col, num_cols, toks, tok_mask,
                 dst_rows, BLOCK_F: tl.constexpr):
    """Copy ``num_cols`` features of new tokens ``toks`` (BLOCK_Q,) of one segment to rows ``dst_rows``."""
    for f0 in range(0, num_cols, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = tok_mask[:, None] & (cols < num_cols)[None, :]
        tile = tl.load(new_ptr + toks[:, None] * stride_tok + cols[None, :] * stride_col, mask=mask)
        tl.store(dst_ptr + dst_rows[:, None] * stride_row + cols[None, :] * stride_dst_col, tile, mask=mask)


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
    new_a_seg = new_a_ptr + seg.to(tl.int64) * stride_na_seg
    _copy_tokens(new_a_seg, stride_na_tok, stride_na_col, dst_a_ptr, stride_da_row, stride_da_col, cols_a,
                 toks, tok_mask, dst_rows, BLOCK_FA)
    if HAS_B:
        new_b_seg = new_b_ptr + seg.to(tl.int64) * stride_nb_seg
        _copy_tokens(new_b_seg, stride_nb_tok, stride_nb_col, dst_b_ptr, stride_db_row, stride_db_col, cols_b,
                     toks, tok_mask, dst_rows, BLOCK_FB)


def _launch_append(pair, has_b: bool, starts, lengths, block_q: int) -> None:
    """pair: two (dst, new) of a (N_cap, F) integer view and the matching (S, q, F) one (``in_pairs``); the second
    is written only when ``has_b``."""
    (a_dst, a_new), (b_dst, b_new) = pair
    num_segments, num_new = a_new.shape[:2]
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
    device = kernel_device("dst", dst[0])
    num_segments, num_new = new[0].shape[:2]
    if num_segments == 0 or num_new == 0:
        return
    starts, lengths = int64_on(device, starts, lengths)
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
    for pair, has_b in in_pairs(movable):
        _launch_append(pair, has_b, starts, lengths, block_q)


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
