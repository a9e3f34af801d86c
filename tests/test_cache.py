"""CompressedCache storage: ragged append without copies, compaction frees memory, dense views, beams."""

from __future__ import annotations

import torch

from gatekv.cache import CompressedCache, CompressedLayer

B, H, D = 2, 3, 4


def filled_layer(length=10, reserve=4):
    layer = CompressedLayer(reserve=reserve, growth=1.5)
    keys = torch.arange(B * H * length * D, dtype=torch.float32).reshape(B, H, length, D)
    positions = torch.arange(length).repeat(B, 1)
    positions[1, :3] = -1
    layer.append(keys, -keys, positions)
    return layer, keys, positions


def test_prefill_append_is_exact_and_dense_view_round_trips():
    layer, keys, positions = filled_layer()
    k, v, pos, _ = layer.dense_view()
    assert torch.equal(k, keys) and torch.equal(v, -keys)
    assert torch.equal(pos, positions[:, None, :].expand(B, H, -1))
    assert layer.lengths.tolist() == [10] * (B * H)


def test_compaction_keeps_ragged_selection_and_frees_memory():
    layer, keys, _ = filled_layer(length=10, reserve=4)
    counts = torch.tensor([[3, 0, 10], [1, 5, 2]])
    indices = torch.zeros(B, H, 10, dtype=torch.long)
    chosen = {}
    for b in range(B):
        for h in range(H):
            idx = torch.sort(torch.randperm(10, generator=torch.Generator().manual_seed(b * 7 + h))[: counts[b, h]]).values
            indices[b, h, : counts[b, h]] = idx
            chosen[b, h] = idx
    before = layer.kv_bytes()
    layer.compact(indices, counts)
    assert layer.kv_bytes() == int((counts + 4).sum()) * D * 4 * 2 < before
    k, v, pos, _ = layer.dense_view()
    for (b, h), idx in chosen.items():
        n = len(idx)
        assert torch.equal(k[b, h, :n], keys[b, h, idx])
        assert torch.equal(v[b, h, :n], -keys[b, h, idx])
        assert bool((pos[b, h, n:] == -1).all())


def test_decode_appends_write_in_place_and_grow_geometrically():
    layer, _, _ = filled_layer(length=10, reserve=4)
    counts = torch.full((B, H), 5)
    indices = torch.arange(10).repeat(B, H, 1)
    layer.compact(indices, counts)
    pointer = layer.keys.data_ptr()
    for step in range(4):  # fits in the reserve: no reallocation, no copy
        token = torch.full((B, H, 1, D), float(step))
        layer.append(token, token, torch.full((B, 1), 100 + step))
        assert layer.keys.data_ptr() == pointer
    regrows = layer.regrow_count
    steps = 300
    for step in range(steps):
        token = torch.full((B, H, 1, D), float(step))
        layer.append(token, token, torch.full((B, 1), 200 + step))
    # geometric growth: O(log n) reallocations for n appended tokens
    assert layer.regrow_count - regrows <= 12
    k, _, pos, _ = layer.dense_view()
    assert k.shape[2] == 5 + 4 + steps
    assert torch.equal(pos[0, 0, -steps:], torch.arange(200, 200 + steps))
    assert bool((layer.caps <= (layer.lengths.double() * 1.5).ceil().long() + 4 + 1).all())


def test_ragged_appends_after_uneven_compaction():
    layer, keys, _ = filled_layer(length=8, reserve=0)
    counts = torch.tensor([[1, 8, 0], [4, 2, 3]])
    indices = torch.arange(8).repeat(B, H, 1)
    layer.compact(indices, counts, reserve=0)
    token = torch.full((B, H, 2, D), 9.0)
    layer.append(token, token, torch.tensor([[50, 51], [50, 51]]))
    assert layer.lengths.reshape(B, H).tolist() == (counts + 2).tolist()
    k, _, pos, _ = layer.dense_view()
    for b in range(B):
        for h in range(H):
            n = int(counts[b, h])
            assert torch.equal(k[b, h, :n], keys[b, h, :n])
            assert pos[b, h, n : n + 2].tolist() == [50, 51]


def test_state_follows_compaction():
    layer, _, _ = filled_layer(length=6)
    dense = torch.arange(B * H * 6, dtype=torch.float32).reshape(B, H, 6)
    layer.write_state({"score": dense})
    indices = torch.tensor([1, 4, 5]).repeat(B, H, 1)
    layer.compact(indices, torch.full((B, H), 3))
    assert torch.equal(layer.dense_view()[3]["score"], dense[..., [1, 4, 5]])


def test_batch_select_reorders_rows():
    layer, keys, _ = filled_layer(length=5)
    layer.batch_select_indices(torch.tensor([1, 0, 1]))
    k, _, _, _ = layer.dense_view()
    assert k.shape[0] == 3
    assert torch.equal(k[0], keys[1]) and torch.equal(k[1], keys[0]) and torch.equal(k[2], keys[1])


def test_cache_reports_logical_length():
    cache = CompressedCache(num_layers=2, reserve=2)
    positions = torch.arange(6).repeat(B, 1)
    cache.begin_forward(positions)
    for layer in range(2):
        cache.update(torch.zeros(B, H, 6, D), torch.zeros(B, H, 6, D), layer)
    cache.layers[0].compact(torch.arange(6).repeat(B, H, 1), torch.full((B, H), 2))
    assert cache.get_seq_length() == 6  # logical, not the 2 physical slots
    assert cache.kept_tokens().shape == (2, B, H)
    assert not cache.is_compileable
    cache.begin_forward(torch.full((B, 3), 6), advance=False)  # observers do not count
    assert cache.get_seq_length() == 6
