"""The decode append's CPU fast path (one indexed write per buffer, no per-call checks) writes exactly what the
reference append writes, and the cached free-slot count follows every layout change (regrowth still happens)."""

from __future__ import annotations

import torch

from gatekv.cache import CompressedCache, CompressedLayer, ForwardTokens
from gatekv.kernels import reference

B, H, D = 2, 3, 4


def ragged_layer(reserve=2, state=True):
    layer = CompressedLayer(reserve=reserve, growth=1.5)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, H, 12, D, generator=g)
    positions = torch.arange(12).repeat(B, 1)
    positions[1, :2] = -1
    layer.append(keys, keys * 2, positions)
    if state:
        layer.write_state({"acc": torch.rand(B, H, 12, generator=g)})
    counts = torch.tensor([[3, 7, 12], [0, 5, 9]])
    indices = torch.sort(torch.rand(B, H, 12, generator=g), -1).indices.sort(-1).values
    layer.compact(indices, counts)
    return layer


def test_decode_append_equals_reference_append_with_ragged_lengths_and_state():
    layer = ragged_layer()
    for step in range(5):  # the reserve (2) runs out at step 2: the regrowth path is crossed too
        expected = [t.clone() for t in layer._buffers()[0]]
        starts, lengths = layer.starts.clone(), layer.lengths.clone()
        fits = layer.free_slots() >= 1
        k = torch.randn(B, H, 1, D)
        positions = torch.tensor([[20 + step], [30 + step]])
        nan = torch.full((B * H, 1), float("nan"))
        new = [k.reshape(B * H, 1, D), (-k).reshape(B * H, 1, D), positions[:, None, :].expand(B, H, 1).reshape(B * H, 1), nan]
        layer.append(k, -k, positions, ForwardTokens(positions))
        assert layer.lengths.tolist() == (lengths + 1).tolist()
        if fits:  # same buffers: compare with the reference append on copies
            reference.append_reference(expected, starts, lengths, new)
            for got, want in zip(layer._buffers()[0], expected):
                assert torch.equal(torch.nan_to_num(got, nan=-7.0), torch.nan_to_num(want, nan=-7.0))
        k_dense, v_dense, pos_dense, state = layer.dense_view()
        for s in range(B * H):
            b, h = divmod(s, H)
            n = int(layer.lengths[s])
            assert torch.equal(k_dense[b, h, n - 1], k[b, h, 0]) and torch.equal(v_dense[b, h, n - 1], -k[b, h, 0])
            assert int(pos_dense[b, h, n - 1]) == int(positions[b, 0])
            assert torch.isnan(state["acc"][b, h, n - 1])
    assert layer.regrow_count >= 1
    assert layer.min_position.tolist() == [0, 2]  # row 1's padding is not a position


def test_free_slots_follow_compaction_crop_and_eviction():
    layer = ragged_layer(reserve=3, state=False)
    assert layer.free_slots() == int((layer.caps - layer.lengths).min()) == 3
    one = torch.zeros(B, H, 1, D)
    layer.append(one, one, torch.tensor([[40], [40]]))
    assert layer.free_slots() == 2 == int((layer.caps - layer.lengths).min())
    layer.crop(-1)
    assert layer.free_slots() == int((layer.caps - layer.lengths).min()) == 3
    counts = torch.minimum(layer.lengths.reshape(B, H), torch.tensor(2))
    indices = torch.arange(int(layer.lengths.max())).repeat(B, H, 1)
    layer.evict_in_place(indices, counts)
    assert layer.free_slots() == int((layer.caps - layer.lengths).min())
    layer.compact(indices[..., :2], counts, reserve=0)
    assert layer.free_slots() == 0
    layer.append(one, one, torch.tensor([[41], [41]]))  # no room: must regrow, not write past a segment
    assert layer.regrow_count >= 1 and layer.free_slots() == int((layer.caps - layer.lengths).min()) >= 0


def test_cache_update_shares_one_forward_tokens_across_layers():
    cache = CompressedCache(num_layers=3, reserve=2)
    positions = torch.arange(4).repeat(B, 1)
    cache.begin_forward(positions)
    for layer_idx in range(3):
        k = torch.full((B, H, 4, D), float(layer_idx))
        cache.update(k, k, layer_idx)
    shared = cache._pending_tokens
    assert shared.positions is positions and set(shared._expanded) == {H}
    for layer in cache.layers:
        assert layer.lengths.tolist() == [4] * (B * H)
        assert torch.equal(layer.positions[layer._filled_rows()], positions[:, None, :].expand(B, H, 4).reshape(-1))


def test_dense_view_of_a_regular_layout_is_a_view_equal_to_the_padded_copy():
    layer = CompressedLayer(reserve=3)
    g = torch.Generator().manual_seed(1)
    positions = torch.arange(12).repeat(B, 1)
    positions[1, :2] = -1
    layer.append(torch.randn(B, H, 12, D, generator=g), torch.randn(B, H, 12, D, generator=g), positions)
    layer.write_state({"acc": torch.rand(B, H, 12, generator=g)})
    indices = torch.sort(torch.rand(B, H, 12, generator=g), -1).indices[..., :3].sort(-1).values
    layer.compact(indices, torch.full((B, H), 3))  # every segment 3 slots at one stride (3 + reserve 3)
    one = torch.randn(B, H, 1, D)
    layer.append(one, one, torch.tensor([[50], [50]]))
    copied = CompressedLayer._regular_views
    try:  # the padded-copy path, for comparison
        CompressedLayer._regular_views = lambda self, t: None
        want = layer.dense_view()
    finally:
        CompressedLayer._regular_views = copied
    got = layer.dense_view()
    assert got[0].untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr()  # no copy of the bulk
    assert got[2].untyped_storage().data_ptr() != layer.positions.untyped_storage().data_ptr()  # positions: a copy
    for g, w in zip(got[:3], want[:3]):
        assert torch.equal(torch.nan_to_num(g, nan=-7.0), torch.nan_to_num(w, nan=-7.0))
    assert set(got[3]) == set(want[3]) == {"acc"}
    assert torch.equal(torch.nan_to_num(got[3]["acc"], nan=-7.0), torch.nan_to_num(want[3]["acc"], nan=-7.0))
    layer.lengths[0] -= 1  # uneven lengths: the padded copy again
    layer._host_layout = None
    assert layer.dense_view()[0].untyped_storage().data_ptr() != layer.keys.untyped_storage().data_ptr()
