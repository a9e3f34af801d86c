"""CompressedCache.crop: dropping the newest tokens restores exactly the storage held before they came."""

from __future__ import annotations

import pytest
import torch

from gatekv.cache import CompressedCache, CompressedLayer

B, H, D = 2, 3, 4


def _view(layer):
    keys, values, positions, state = layer.dense_view()
    return keys, values, positions, state


def _layer_with_ragged_segments():
    layer = CompressedLayer(reserve=2)
    keys = torch.randn(B, H, 12, D, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).repeat(B, 1)
    positions[1, :2] = -1  # left padding of row 1
    layer.append(keys, keys * 2, positions)
    counts = torch.tensor([[3, 7, 12], [5, 1, 9]])
    indices = torch.arange(12).repeat(B, H, 1)
    layer.compact(indices, counts)
    return layer


@pytest.mark.parametrize("dropped", [1, 3, 7])
def test_crop_restores_the_storage_before_the_appends(dropped):
    layer = _layer_with_ragged_segments()
    before = [t.clone() for t in _view(layer)[:3]]
    lengths = layer.lengths.clone()
    for step in range(dropped):
        token = torch.full((B, H, 1, D), 100.0 + step)
        layer.append(token, token, torch.full((B, 1), 12 + step))
    layer.crop(-dropped)
    assert torch.equal(layer.lengths, lengths)
    for got, want in zip(_view(layer)[:3], before):
        assert torch.equal(got, want)
    token = torch.full((B, H, 1, D), 7.0)  # appending again lands right after the kept tokens
    layer.append(token, token, torch.full((B, 1), 12))
    assert torch.equal(layer.lengths, lengths + 1)
    keys, _, positions, _ = _view(layer)
    for s, n in enumerate(lengths.tolist()):
        b, h = divmod(s, H)
        assert positions[b, h, n] == 12 and bool((keys[b, h, n] == 7.0).all())


def test_crop_of_tokens_not_at_the_segment_tails_keeps_the_rest_in_order():
    """After an in-place refill (decode_budget), the newest tokens may sit anywhere: crop drops them by position."""
    layer = _layer_with_ragged_segments()
    for step in range(2):
        token = torch.full((B, H, 1, D), 50.0 + step)
        layer.append(token, token, torch.full((B, 1), 12 + step))
    # move the newest token of segment 0 into its slot 0 (what an in-place eviction of slot 0 does)
    start = int(layer.starts[0])
    last = start + int(layer.lengths[0]) - 1
    for buffer in (layer.keys, layer.values, layer.positions):
        buffer[start] = buffer[last]
    layer.lengths[0] -= 1
    layer._host_layout = None
    expected = []
    keys, values, positions, _ = _view(layer)
    for b in range(B):
        for h in range(H):
            filled = torch.arange(positions.shape[-1]) < layer.lengths.reshape(B, H)[b, h]
            keep = filled & (positions[b, h] < 13)  # padding (-1) stays, position 13 goes
            expected.append((keys[b, h][keep], positions[b, h][keep]))
    layer.crop(-1)  # drops position 13 in every segment
    keys, values, positions, _ = _view(layer)
    for s, (want_keys, want_positions) in enumerate(expected):
        b, h = divmod(s, H)
        n = int(layer.lengths[s])
        assert torch.equal(positions[b, h, :n], want_positions)
        assert torch.equal(keys[b, h, :n], want_keys)
        assert not bool((positions[b, h, :n] == 13).any())


def test_cache_crop_updates_the_logical_length_and_rejects_bad_counts():
    cache = CompressedCache(num_layers=2, reserve=1)
    cache.begin_forward(torch.arange(5).repeat(B, 1))
    for layer in range(2):
        cache.update(torch.zeros(B, H, 5, D), torch.zeros(B, H, 5, D), layer)
    assert cache.is_croppable
    cache.crop(0)
    assert cache.get_seq_length() == 5
    cache.crop(-2)
    assert cache.get_seq_length() == 3
    assert cache.kept_tokens().unique().tolist() == [3]
    with pytest.raises(ValueError, match="n <= 0"):
        cache.crop(2)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-4)
