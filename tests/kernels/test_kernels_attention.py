"""ragged_attention (decode and short chunks): the Triton kernel against the reference.

Tolerances: see the table in ``_kernel_cases.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _kernel_cases import DEVICE, assert_within, low_precision_attention, ragged_cache  # noqa: E402

from gatekv.kernels import reference  # noqa: E402
from gatekv.kernels import triton_kernels as tk  # noqa: E402


def _attention_case(num_batch, num_kv_heads, group, head_dim, q_len, dtype, seed):
    """A ragged cache with an empty segment, a full one, left padding; queries see part of the future."""
    gen = torch.Generator().manual_seed(seed)
    num_segments = num_batch * num_kv_heads
    caps = torch.randint(20, 160, (num_segments,), generator=gen).tolist()
    lengths = [int(c * r) for c, r in zip(caps, torch.rand(num_segments, generator=gen).tolist())]
    lengths[0] = 0
    if num_segments > 1:
        lengths[1] = caps[1]
    cache = ragged_cache(lengths, caps, head_dim, head_dim, dtype, gen)
    query = torch.randn(num_batch, num_kv_heads * group, q_len, head_dim, generator=gen).to(dtype).to(DEVICE)
    # positions near the end of the stored ones: the last query sees everything, earlier ones less
    last = int(cache["positions"].max()) + 1
    query_positions = (last - q_len + 1 + torch.arange(q_len)).expand(num_batch, q_len).clone()
    query_positions[-1, 0] = -5  # a query that sees no key: zeros
    return query, query_positions.to(DEVICE), cache


def _check_attention(query, query_positions, cache, scale, window, got, dtype):
    expected32 = reference.ragged_attention_reference(
        query.float(), query_positions, cache["keys"].float(), cache["values"].float(), cache["positions"],
        cache["starts"], cache["lengths"], scale, window,
    )
    assert got.dtype == query.dtype and got.shape == expected32.shape
    low = None
    if dtype != torch.float32:  # flash-attention's rule: PyTorch attention with matmuls in the same dtype
        low = torch.zeros_like(expected32)
        batch, num_q_heads = query.shape[:2]
        num_kv_heads = cache["starts"].numel() // batch
        group = num_q_heads // num_kv_heads
        for s in range(batch * num_kv_heads):
            b, h = divmod(s, num_kv_heads)
            start, length = int(cache["starts"][s]), int(cache["lengths"][s])
            if length == 0:
                continue
            kpos = cache["positions"][start : start + length]
            allowed = reference._segment_mask(kpos, query_positions[b], window)
            low[b, h * group : (h + 1) * group] = low_precision_attention(
                query[b, h * group : (h + 1) * group], cache["keys"][start : start + length],
                cache["values"][start : start + length], allowed, scale, dtype,
            )
    assert_within("ragged_attention", got, expected32, dtype, low)


@pytest.mark.parametrize(
    "num_batch, num_kv_heads, group, head_dim, q_len, dtype, num_splits, window",
    [
        (1, 1, 1, 32, 1, torch.float32, 1, None),
        (2, 2, 4, 64, 1, torch.float32, 4, None),  # decode, split-K
        (3, 1, 2, 128, 1, torch.bfloat16, 2, None),
        (2, 4, 1, 32, 1, torch.float16, 1, 7),  # sliding window
        (1, 4, 3, 32, 4, torch.float16, 3, None),  # G = 3, four queries
        (2, 2, 2, 64, 16, torch.float32, 2, 16),  # a chunk of 16 queries with a window
        (1, 2, 4, 32, 16, torch.bfloat16, 1, None),  # 64 rows per program
        (1, 1, 8, 32, 12, torch.float32, 3, None),  # 96 rows: two row blocks
    ],
)
def test_ragged_attention_matches_reference(num_batch, num_kv_heads, group, head_dim, q_len, dtype, num_splits,
                                            window):
    query, query_positions, cache = _attention_case(num_batch, num_kv_heads, group, head_dim, q_len, dtype,
                                                    seed=head_dim + q_len + group)
    scale = head_dim**-0.5
    got = tk.ragged_attention(query, query_positions, cache["keys"], cache["values"], cache["positions"],
                              cache["starts"], cache["lengths"], scale, window, num_splits=num_splits)
    _check_attention(query, query_positions, cache, scale, window, got, dtype)
    assert torch.count_nonzero(got[-1, :, 0]) == 0  # the query at position -5 sees no key: exact zeros


def test_ragged_attention_default_splits_and_long_segment():
    """A 600-token segment next to short ones, block_t 128 and the default number of splits."""
    gen = torch.Generator().manual_seed(3)
    cache = ragged_cache([600, 3, 0, 40], [600, 10, 4, 64], 32, 32, torch.float32, gen)
    query = torch.randn(2, 4, 1, 32, generator=gen).to(DEVICE)
    query_positions = torch.tensor([[2000], [2000]], device=DEVICE)
    args = (query, query_positions, cache["keys"], cache["values"], cache["positions"], cache["starts"],
            cache["lengths"], 0.2)
    for num_splits in (None, 5):
        got = tk.ragged_attention(*args, num_splits=num_splits, block_t=128)
        _check_attention(query, query_positions, cache, 0.2, None, got, torch.float32)


def test_ragged_attention_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(9)
    cache = ragged_cache([50, 0, 77, 12], [64, 8, 80, 12], 32, 48, torch.float32, gen)
    rows = cache["keys"].shape[0]
    wide = torch.randn(rows, 96, generator=gen).to(DEVICE)
    wide[:, 8:40] = cache["keys"]
    keys = wide[:, 8:40]  # row stride 96
    values = cache["values"].t().contiguous().t()  # column-major, d_v = 48 != d
    positions = torch.stack([cache["positions"], cache["positions"]], 1)[:, 0]  # stride 2
    query = torch.randn(2, 3, 4, 32, generator=gen).to(DEVICE).transpose(1, 2)  # (B, H_q=4, q=3, d), strided
    query_positions = torch.tensor([[150, 151, 152], [10, 20, 400]], device=DEVICE).t().contiguous().t()
    got = tk.ragged_attention(query, query_positions, keys, values, positions, cache["starts"], cache["lengths"],
                              0.3, num_splits=2)
    expected = reference.ragged_attention_reference(query, query_positions, keys, values, positions,
                                                    cache["starts"], cache["lengths"], 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ragged_attention_all_segments_empty():
    gen = torch.Generator().manual_seed(1)
    cache = ragged_cache([0, 0], [0, 5], 16, 16, torch.float16, gen)
    query = torch.randn(1, 4, 1, 16, generator=gen).half().to(DEVICE)
    got = tk.ragged_attention(query, torch.tensor([[3]], device=DEVICE), cache["keys"], cache["values"],
                              cache["positions"], cache["starts"], cache["lengths"], 0.25, num_splits=2)
    assert got.dtype == torch.float16 and torch.count_nonzero(got) == 0
