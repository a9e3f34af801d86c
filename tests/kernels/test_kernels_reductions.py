"""window_attention and column_max_logits: the Triton kernels against the reference.

Both return float32; tolerances from the table in ``_kernel_cases.py`` (fp32 inputs 1e-5, 16-bit inputs 2e-3).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _kernel_cases import DEVICE, TOLERANCES  # noqa: E402

from gatekv.kernels import reference  # noqa: E402
from gatekv.kernels import triton_kernels as tk  # noqa: E402


def _dense_case(num_batch, num_kv_heads, group, n, num_keys, head_dim, dtype, seed, shared_positions=False):
    """Padded dense keys (left padding per head), queries at the end plus one before every key."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(num_batch, num_kv_heads * group, n, head_dim, generator=gen).to(dtype)
    keys = torch.randn(num_batch, num_kv_heads, num_keys, head_dim, generator=gen).to(dtype)
    key_positions = torch.arange(num_keys).repeat(num_batch, num_kv_heads, 1)
    pad = torch.randint(0, max(num_keys // 3, 1), (num_batch, num_kv_heads), generator=gen)
    key_positions[torch.arange(num_keys) < pad[..., None]] = -1
    if shared_positions:
        key_positions = key_positions[:, 0]
    query_positions = (num_keys - n + torch.arange(n)).repeat(num_batch, 1)
    query_positions[0, 0] = num_keys // 2  # sees half the keys
    query_positions[-1, -1] = -1  # sees nothing (window: zeros; column max: ignored)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(queries), to(query_positions), to(keys), to(key_positions)


@pytest.mark.parametrize(
    "num_batch, num_kv_heads, group, w, num_keys, head_dim, dtype, num_splits",
    [
        (1, 1, 1, 4, 37, 32, torch.float32, 1),
        (2, 2, 4, 8, 300, 64, torch.float32, 3),
        (1, 2, 2, 5, 150, 128, torch.bfloat16, 1),
        (2, 1, 3, 6, 100, 32, torch.float16, 2),
        (1, 1, 8, 12, 70, 32, torch.float32, None),  # 96 rows: two row blocks
    ],
)
def test_window_attention_matches_reference(num_batch, num_kv_heads, group, w, num_keys, head_dim, dtype,
                                            num_splits):
    queries, qpos, keys, kpos = _dense_case(num_batch, num_kv_heads, group, w, num_keys, head_dim, dtype, seed=w)
    scale = head_dim**-0.5
    got = tk.window_attention(queries, qpos, keys, kpos, scale, num_splits=num_splits)
    expected = reference.window_attention_reference(queries, qpos, keys, kpos, scale)
    assert got.dtype == torch.float32
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert torch.count_nonzero(got[-1, :, -1]) == 0


def test_window_attention_non_contiguous():
    queries, qpos, keys, kpos = _dense_case(2, 2, 2, 4, 90, 32, torch.float32, seed=4)
    queries = queries.transpose(1, 2).contiguous().transpose(1, 2)
    keys = keys.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # (B, T, H, d) storage
    kpos = kpos.transpose(1, 2).contiguous().transpose(1, 2)
    got = tk.window_attention(queries, qpos, keys, kpos, 0.2, num_splits=2)
    torch.testing.assert_close(got, reference.window_attention_reference(queries, qpos, keys, kpos, 0.2),
                               atol=1e-5, rtol=1e-5)


def _assert_column_max(got, expected, dtype):
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    finite = ~torch.isneginf(expected)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got[finite], expected[finite], atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "num_batch, num_kv_heads, group, n, num_keys, head_dim, dtype, shared",
    [
        (1, 1, 1, 5, 37, 32, torch.float32, False),
        (2, 2, 4, 20, 300, 64, torch.float32, True),
        (1, 4, 2, 9, 130, 128, torch.bfloat16, False),
        (3, 1, 3, 40, 100, 32, torch.float16, True),  # 120 rows: two row blocks
    ],
)
def test_column_max_logits_matches_reference(num_batch, num_kv_heads, group, n, num_keys, head_dim, dtype, shared):
    queries, qpos, keys, kpos = _dense_case(num_batch, num_kv_heads, group, n, num_keys, head_dim, dtype, seed=n,
                                            shared_positions=shared)
    scale = head_dim**-0.5
    got = tk.column_max_logits(queries, qpos, keys, kpos, scale)
    _assert_column_max(got, reference.column_max_logits_reference(queries, qpos, keys, kpos, scale), dtype)


def test_column_max_logits_long_context():
    """T = 12K keys: memory is the output only; big key blocks keep the interpreter fast."""
    queries, qpos, keys, kpos = _dense_case(1, 2, 2, 8, 12_000, 32, torch.float32, seed=12)
    keys = keys.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous as well
    got = tk.column_max_logits(queries, qpos, keys, kpos, 0.125, block_t=2048)
    _assert_column_max(got, reference.column_max_logits_reference(queries, qpos, keys, kpos, 0.125), torch.float32)


def test_reductions_with_no_queries_or_keys():
    queries, qpos, keys, kpos = _dense_case(1, 2, 2, 3, 20, 32, torch.float32, seed=2)
    got = tk.column_max_logits(queries[:, :, :0], qpos[:, :0], keys, kpos, 0.1)
    assert torch.isneginf(got).all()
    assert tk.window_attention(queries, qpos, keys[:, :, :0], kpos[:, :, :0], 0.1).shape == (1, 4, 3, 0)
