"""The PyTorch decode fast path (``torch_ragged.ragged_decode_unmasked``, used on CPU) against the reference.

Regular layouts (every segment at ``s * stride``: one SDPA over a strided view) and irregular ones (one SDPA per
segment), equal and unequal lengths, an empty segment, batch > 1, GQA groups 1/2/4, fp32/fp16/bf16. Tolerances:
the table in ``_kernel_cases.py``.
"""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import assert_within, low_precision_attention

from gatekv.kernels.reference import layout_from_caps, ragged_attention_reference
from gatekv.kernels.torch_ragged import ragged_decode_unmasked, regular_stride


def _decode_case(batch, kv_heads, group, lengths, caps, dtype, seed=0, head_dim=32):
    """A decode query and flat storage whose unfilled room holds large garbage (reading it would show)."""
    g = torch.Generator().manual_seed(seed)
    caps_t = torch.tensor(caps)
    starts, rows = layout_from_caps(caps_t)
    keys = (torch.randn(rows, head_dim, generator=g) * 50).to(dtype)
    values = (torch.randn(rows, head_dim, generator=g) * 50).to(dtype)
    positions = torch.full((rows,), -1, dtype=torch.long)
    for s, (start, length) in enumerate(zip(starts.tolist(), lengths)):
        keys[start : start + length] = torch.randn(length, head_dim, generator=g).to(dtype)
        values[start : start + length] = torch.randn(length, head_dim, generator=g).to(dtype)
        positions[start : start + length] = torch.arange(length) * 2
    query = torch.randn(batch, kv_heads * group, 1, head_dim, generator=g).to(dtype)
    query_positions = torch.full((batch, 1), 10_000)
    return query, query_positions, keys, values, positions, starts, torch.tensor(lengths)


def _low_precision(query, keys, values, starts, lengths, scale, dtype):
    """The same attention computed by PyTorch in ``dtype`` (flash-attention's baseline), float32 (B, H_q, 1, d)."""
    batch, num_q_heads = query.shape[:2]
    kv_heads = starts.numel() // batch
    group = num_q_heads // kv_heads
    out = torch.zeros(batch, num_q_heads, 1, values.shape[-1])
    for s, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if length == 0:
            continue
        b, h = divmod(s, kv_heads)
        allowed = torch.ones(1, length, dtype=torch.bool)
        out[b, h * group : (h + 1) * group] = low_precision_attention(
            query[b, h * group : (h + 1) * group].float(), keys[start : start + length].float(),
            values[start : start + length].float(), allowed, scale, dtype,
        )
    return out


CASES = [
    # batch, kv_heads, group, lengths (S = batch * kv_heads), caps, regular layout
    (1, 3, 3, [40, 40, 40], [45, 45, 45], True),  # uniform allocation: equal lengths and capacities
    (2, 2, 2, [17, 9, 33, 1], [40, 40, 40, 40], True),  # equal capacities, unequal lengths (masked)
    (3, 2, 4, [5, 0, 12, 12, 7, 3], [12, 12, 12, 12, 12, 12], True),  # an empty segment, a full one
    (1, 1, 1, [23], [30], True),  # one segment, no GQA
    (2, 2, 2, [17, 9, 33, 1], [20, 12, 36, 3], False),  # Ada-KV style: capacities differ
    (1, 3, 3, [40, 40, 40], [45, 46, 45], False),  # equal lengths, irregular starts
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, kv_heads, group, lengths, caps, regular", CASES)
def test_decode_equals_reference(batch, kv_heads, group, lengths, caps, regular, dtype):
    query, qpos, keys, values, positions, starts, lengths_t = _decode_case(batch, kv_heads, group, lengths, caps, dtype)
    assert (regular_stride(starts.tolist(), lengths, keys.shape[0]) is not None) == regular
    scale = query.shape[-1] ** -0.5
    got = ragged_decode_unmasked(query, keys, values, starts.tolist(), lengths, scale)
    assert got.shape == (batch, kv_heads * group, 1, values.shape[-1]) and got.dtype == dtype
    expected = ragged_attention_reference(
        query.float(), qpos, keys.float(), values.float(), positions, starts, lengths_t, scale
    )
    low = None if dtype == torch.float32 else _low_precision(query, keys, values, starts, lengths_t, scale, dtype)
    assert_within("ragged_decode_unmasked", got, expected, dtype, low)
    for s, length in enumerate(lengths):
        if length == 0:
            b, h = divmod(s, kv_heads)
            assert bool((got[b, h * group : (h + 1) * group] == 0).all())


def test_regular_stride_bounds():
    # the last segment's view must fit in the buffer; a segment longer than the stride is not regular
    assert regular_stride([0, 10, 20], [10, 10, 10], 30) == 10
    assert regular_stride([0, 10, 20], [10, 10, 10], 29) is None
    assert regular_stride([0, 10, 20], [3, 11, 2], 40) is None
    assert regular_stride([0, 10, 21], [3, 3, 3], 40) is None
    assert regular_stride([0], [7], 7) == 7
    assert regular_stride([], [], 0) is None


def test_all_segments_empty_gives_zeros():
    query, _, keys, values, _, starts, _ = _decode_case(2, 2, 2, [0, 0, 0, 0], [4, 4, 4, 4], torch.float32)
    out = ragged_decode_unmasked(query, keys, values, starts.tolist(), [0, 0, 0, 0], 0.5)
    assert out.shape == (2, 4, 1, 32) and bool((out == 0).all())
