"""Triton merge: fold dropped tokens into the kept ones of the compacted storage, in place; weighted sums in
fp32 with atomics (equal to the reference within fp32 rounding; the order of the additions is not fixed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatekv.kernels import checks
from gatekv.kernels.triton_common import INTERPRETED, require_kernel_device

__all__ = ["merge"]


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
    block_e = 16 if not INTERPRETED else 64
    block_f = min(128, triton.next_power_of_2(max(flat_src.shape[1], 1)))
    grid = (num_segments, triton.cdiv(e_max, block_e))
    _merge_accumulate_kernel[grid](
        flat_src, flat_src.stride(0), flat_src.stride(1), acc, acc.stride(0), weight_sum, flat_src.shape[1],
        src_starts, dst_starts, sources, targets, weights, sources.stride(0), counts,
        SUM_WEIGHTS=sum_weights, BLOCK_E=block_e, BLOCK_F=block_f,
    )


def merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts, *, validate: bool = True) -> None:
    """Triton version of ``reference.merge_reference`` (in place). Sums run in fp32 with atomics, so the result
    matches the reference within fp32 rounding (the order of the additions is not fixed)."""
    if validate:
        checks.check_merge(dst, dst_starts, src, src_starts, sources, targets, weights, source_counts)
    if sources.shape[1] == 0 or dst[0].shape[0] == 0:
        return
    device = dst[0].device
    for name, buf in (("dst[0]", dst[0]), ("src[0]", src[0])):
        require_kernel_device(buf.device, name)
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
