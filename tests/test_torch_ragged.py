"""The fast PyTorch paths (used on CPU) equal the reference ragged attention."""

from __future__ import annotations

import pytest
import torch

from gatekv.kernels import layout_from_caps
from gatekv.kernels.reference import ragged_attention_reference
from gatekv.kernels.torch_ragged import ragged_attention_sdpa, ragged_decode_unmasked


def ragged_case(batch, kv_heads, group, q_len, lengths, d=16, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    caps = lengths + 3
    starts, rows = layout_from_caps(caps)
    keys = torch.randn(rows, d, generator=g)
    values = torch.randn(rows, d, generator=g)
    positions = torch.full((rows,), -1, dtype=torch.long)
    for s, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        # sorted distinct positions < 100 with some holes (evicted tokens); a few padding slots first
        pos = torch.sort(torch.randperm(100, generator=g)[:length]).values
        pos[: min(pad, length)] = -1
        positions[start : start + length] = pos
    query = torch.randn(batch, kv_heads * group, q_len, d, generator=g)
    query_positions = torch.arange(100, 100 + q_len).repeat(batch, 1)
    return query, query_positions, keys, values, positions, starts, lengths


@pytest.mark.parametrize("sliding_window", [None, 40])
@pytest.mark.parametrize("q_len", [1, 7])
def test_sdpa_path_equals_reference(q_len, sliding_window):
    case = ragged_case(2, 2, 3, q_len, [5, 0, 37, 12], pad=2)
    query, qpos, keys, values, positions, starts, lengths = case
    qpos = qpos.clone()
    qpos[1, 0] = -1  # a padding query: zeros
    expected = ragged_attention_reference(query, qpos, keys, values, positions, starts, lengths, 0.25, sliding_window)
    got = ragged_attention_sdpa(query, qpos, keys, values, positions, starts.tolist(), lengths.tolist(), 0.25, sliding_window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool((got[1, :, 0] == 0).all())


def test_unmasked_decode_equals_reference():
    query, qpos, keys, values, positions, starts, lengths = ragged_case(3, 2, 2, 1, [4, 9, 0, 1, 30, 2])
    expected = ragged_attention_reference(query, qpos, keys, values, positions, starts, lengths, 0.3)
    got = ragged_decode_unmasked(query, keys, values, starts.tolist(), lengths.tolist(), 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
