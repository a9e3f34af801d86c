"""Shared pieces of the Triton kernels: whether they run under Triton's CPU interpreter, block-size defaults,
device and dtype checks, bit-exact integer views of buffers, and the launch preamble every op repeats (index
tensors on the device, buffers moved two per launch, a program's (batch row, KV head) and query rows).

Under ``TRITON_INTERPRET=1`` (set before the kernels are imported) the kernels run on CPU tensors through
Triton's interpreter; all arithmetic is then done in fp32, because the interpreter computes bf16 arithmetic on
the raw bit patterns. Without the interpreter every tensor must be on a CUDA device.
"""

from __future__ import annotations

from typing import Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
# Bit-exact copies: every buffer is moved as an integer type of the same width.
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _probe():
    pass


INTERPRETED = isinstance(_probe, InterpretedFunction)
"""Whether the kernels were decorated for Triton's CPU interpreter (TRITON_INTERPRET=1 at import time)."""


def as_int_rows(buf: torch.Tensor) -> torch.Tensor:
    """``buf`` (N, *feature) as an integer tensor (N, F) of the same element width (a view where possible)."""
    flat = buf.view(INT_OF_SIZE[buf.element_size()])
    if flat.dim() == 1:
        return flat.unsqueeze(1)
    if flat.dim() == 2:
        return flat
    return flat.reshape(flat.shape[0], -1)


def feature_block(num_cols: int) -> int:
    return min(triton.next_power_of_2(max(num_cols, 1)), 256)


_SM_COUNT: dict[int, int] = {}


def num_programs_wanted(device: torch.device) -> int:
    """About four programs per streaming multiprocessor keep the GPU busy (one under the interpreter, where
    programs run one after the other)."""
    if INTERPRETED or device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 4 * _SM_COUNT[index]


def dot_in_fp32(*tensors: torch.Tensor) -> bool:
    """fp32 tensor-core-free dots for fp32 inputs, mixed dtypes and the interpreter; native 16-bit dots otherwise."""
    dtypes = {t.dtype for t in tensors}
    return INTERPRETED or len(dtypes) > 1 or not dtypes <= {torch.float16, torch.bfloat16}


def check_floats(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOATS:
            raise ValueError(f"{name} has dtype {tensor.dtype}; the Triton kernels take {[str(d) for d in FLOATS]}")


def default_block(value: int | None, compiled: int, interpreted: int, name: str) -> int:
    """A block size: the given one (checked), else the default. The interpreter's cost is per operation, not per
    element, so it gets larger blocks."""
    if value is None:
        return interpreted if INTERPRETED else compiled
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value!r}")
    return value


def require_kernel_device(device: torch.device, name: str) -> None:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU (or CUDA) tensors."""
    if device.type == "cuda" or (INTERPRETED and device.type == "cpu"):
        return
    raise ValueError(
        f"{name} is on {device}: the Triton kernels need CUDA tensors"
        + ("" if INTERPRETED else " (or TRITON_INTERPRET=1 set before the Triton kernels are imported)")
    )


def kernel_device(name: str, tensor: torch.Tensor, **floats: torch.Tensor) -> torch.device:
    """The device the kernels run on: ``tensor``'s (``name`` in the error), after checking that every tensor of
    ``floats`` (name -> tensor) has a floating dtype the kernels take."""
    check_floats(**floats)
    require_kernel_device(tensor.device, name)
    return tensor.device


def int64_on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` (index tensors: starts, lengths, counts) as int64 on ``device``."""
    return [t.to(device=device, dtype=torch.int64) for t in tensors]


def row_block(rows: int) -> int:
    """Query rows per program: ``rows`` rounded up to a power of two, at least 16 (``tl.dot``'s minimum), at most 64."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def dim_block(width: int) -> int:
    """A head or value dimension rounded up to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(width))


def check_splits(num_splits: int) -> None:
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")


def in_pairs(items: list) -> Iterator[tuple[list, bool]]:
    """``items`` two at a time (keys and values share one launch): ``(pair, has_b)`` where ``pair`` always holds two
    entries; without a second one (``has_b`` False) the first stands in for it and the kernel skips it."""
    for start in range(0, len(items), 2):
        pair = list(items[start : start + 2])
        yield (pair if len(pair) == 2 else pair * 2), len(pair) == 2


@triton.jit
def segment_rows(seg, row_block, num_kv_heads, group, num_queries, BLOCK_M: tl.constexpr):
    """The query rows of program (segment ``seg`` = b * H_kv + h, ``row_block``): rows ``r = g * num_queries + i``
    are query head ``h * group + g``, query ``i``. Returns ``(b, h, n_rows, rows, row_ok, head, qi)``, the last four
    (BLOCK_M,)."""
    b = seg // num_kv_heads
    h = seg % num_kv_heads
    n_rows = group * num_queries
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, h, n_rows, rows, rows < n_rows, h * group + rows // num_queries, rows % num_queries


@triton.jit
def row_offsets(b, head, qi, stride_b, stride_h, stride_t):
    """(BLOCK_M, 1) int64 offsets of rows (batch row ``b``, query head ``head``, query ``qi``) in a (B, H_q, q, ...)
    tensor with those strides."""
    return b.to(tl.int64) * stride_b + head.to(tl.int64)[:, None] * stride_h + qi[:, None] * stride_t
