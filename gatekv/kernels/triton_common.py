"""Shared pieces of the Triton kernels: whether they run under Triton's CPU interpreter, block-size defaults,
device and dtype checks, bit-exact integer views of buffers.

Under ``TRITON_INTERPRET=1`` (set before the kernels are imported) the kernels run on CPU tensors through
Triton's interpreter; all arithmetic is then done in fp32, because the interpreter computes bf16 arithmetic on
the raw bit patterns. Without the interpreter every tensor must be on a CUDA device.
"""

from __future__ import annotations

import torch
import triton
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


