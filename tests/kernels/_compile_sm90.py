"""Compile every Triton kernel of ``gatekv.kernels`` (``triton_*.py``) for sm_90 without a GPU.

Run in a process *without* ``TRITON_INTERPRET`` (the kernels must be JIT functions). Prints one line per
compiled variant and exits non-zero on the first failure. Used by ``test_kernels_compile.py``.
"""

import sys
import time

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from gatekv.kernels import triton_append, triton_attention, triton_column_max, triton_compact, triton_window
from gatekv.kernels.triton_common import INTERPRETED

TARGET = GPUTarget("cuda", 90, 32)


def signature(kernel, pointers: dict, constexprs: dict, floats=("scale", "scale_log2")) -> dict:
    """Arguments ending in ``_ptr`` take their type from ``pointers``, ``floats`` are fp32, other ints i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, pointers["*"])
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def variants():
    attn_bf16 = {"*": "*bf16", "qpos_ptr": "*i64", "kpos_ptr": "*i64", "starts_ptr": "*i64",
                 "lengths_ptr": "*i64", "part_o_ptr": "*fp32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32"}
    attn_fp32 = {**attn_bf16, "*": "*fp32"}
    dense_bf16 = {"*": "*bf16", "qpos_ptr": "*i64", "kpos_ptr": "*i64", "part_m_ptr": "*fp32",
                  "part_l_ptr": "*fp32", "out_ptr": "*fp32"}
    dense_fp32 = {**dense_bf16, "*": "*fp32"}
    meta = {"*": "*i64", "src_a_ptr": "*i16", "dst_a_ptr": "*i16", "fill_a_ptr": "*i16"}
    for has_b, fill, fa, fb in ((True, True, 128, 128), (True, False, 1, 4), (False, True, 64, 64)):
        yield triton_compact._compact_kernel, meta, dict(HAS_B=has_b, FILL_GROWTH=fill, BLOCK_K=64, BLOCK_FA=fa, BLOCK_FB=fb)
    for block_q in (1, 16):
        yield triton_append._append_kernel, {"*": "*i16", "starts_ptr": "*i64", "lengths_ptr": "*i64"}, dict(
            HAS_B=True, BLOCK_Q=block_q, BLOCK_FA=128, BLOCK_FB=128)
    for pointers, dot_fp32 in ((attn_bf16, False), (attn_fp32, True)):
        for split in (False, True):
            yield triton_attention._ragged_attention_kernel, pointers, dict(
                HAS_WINDOW=split, SPLIT=split, DOT_FP32=dot_fp32, BLOCK_M=16, BLOCK_T=64, BLOCK_DK=128, BLOCK_DV=128)
    yield triton_attention._ragged_attention_combine_kernel, attn_bf16, dict(BLOCK_M=16, BLOCK_T=64, BLOCK_DV=128)
    for pointers, dot_fp32 in ((dense_bf16, False), (dense_fp32, True)):
        dense_kernels = (triton_window._window_lse_kernel, triton_window._window_weights_kernel,
                         triton_column_max._column_max_kernel)
        for kernel in dense_kernels:
            yield kernel, pointers, dict(DOT_FP32=dot_fp32, BLOCK_M=64, BLOCK_T=64, BLOCK_DK=128)


def main() -> int:
    """``--all``: every variant (about a minute); default: the first variant of each kernel (the bf16 path)."""
    assert not INTERPRETED, "run without TRITON_INTERPRET"
    seen = set()
    for kernel, pointers, constexprs in variants():
        if "--all" not in sys.argv:
            if kernel.__name__ in seen:
                continue
            seen.add(kernel.__name__)
        t0 = time.perf_counter()
        source = ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs), constexprs=constexprs)
        compiled = compile(source, target=TARGET)
        assert "cubin" in compiled.asm, sorted(compiled.asm)
        print(f"ok {kernel.__name__} {constexprs} {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
