"""The fast PyTorch paths (used on CPU) equal the reference ragged attention."""

from __future__ import annotations

import pytest
import torch

from gatekv.kernels import layout_from_caps
from gatekv.kernels.reference import ragged_attention_reference
from gatekv.kernels.torch_ragged import FlatDecodeMask, ragged_attention_sdpa, ragged_decode_unmasked


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


@pytest.mark.parametrize("batch,kv_heads,group", [(1, 3, 3), (3, 2, 2), (2, 4, 1)])
def test_flat_decode_equals_reference(batch, kv_heads, group):
    g = torch.Generator().manual_seed(batch * 10 + kv_heads)
    lengths = torch.randint(1, 40, (batch * kv_heads,), generator=g).tolist()
    query, qpos, keys, values, positions, starts, lengths_t = ragged_case(batch, kv_heads, group, 1, lengths, seed=3)
    caps = lengths_t + 3  # ragged_case's room
    mask = FlatDecodeMask.build(starts, caps, lengths_t, batch, kv_heads)
    expected = ragged_attention_reference(query, qpos, keys, values, positions, starts, lengths_t, 0.3)
    got = ragged_decode_unmasked(query, keys, values, starts.tolist(), lengths, 0.3, flat_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the mask opens exactly the filled slots of each head's segment in its row's range
    for s, (start, length) in enumerate(zip(starts.tolist(), lengths)):
        b, h = divmod(s, kv_heads)
        lo = mask.row_start[b]
        opened = (mask.bias[b, h] == 0).nonzero().flatten() + lo
        assert opened.tolist() == list(range(start, start + length))


def test_flat_mask_follows_decode_appends():
    """A compressed layer with uneven heads keeps its flat mask up to date slot by slot: after each appended token
    the mask equals one built from scratch, and the flat path equals the reference over the grown cache."""
    from gatekv.cache import CompressedLayer

    layer = CompressedLayer(reserve=2)
    g = torch.Generator().manual_seed(0)
    batch, heads, d = 2, 3, 8
    prompt = 12
    keys = torch.randn(batch, heads, prompt, d, generator=g)
    layer.append(keys, torch.randn(batch, heads, prompt, d, generator=g), torch.arange(prompt).repeat(batch, 1))
    counts = torch.tensor([[2, 7, 12], [5, 1, 9]])
    indices = torch.stack([torch.stack([torch.arange(prompt) for _ in range(heads)]) for _ in range(batch)])
    layer.compact(indices, counts, reserve=2)
    assert layer.flat_mask() is not None
    for step in range(5):  # crosses a regrowth (room 2)
        pos = torch.full((batch, 1), prompt + step)
        layer.append(torch.randn(batch, heads, 1, d, generator=g), torch.randn(batch, heads, 1, d, generator=g), pos)
        mask = layer.flat_mask()
        fresh = FlatDecodeMask.build(layer.starts, layer.caps, layer.lengths, batch, heads)
        assert torch.equal(mask.bias, fresh.bias)
        query = torch.randn(batch, heads * 2, 1, d, generator=g)
        qpos = torch.full((batch, 1), prompt + step)
        expected = ragged_attention_reference(query, qpos, layer.keys, layer.values, layer.positions, layer.starts,
                                              layer.lengths, 0.5)
        starts, lengths = layer.host_layout()
        assert lengths == layer.lengths.tolist()
        got = ragged_decode_unmasked(query, layer.keys, layer.values, starts, lengths, 0.5, flat_mask=mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert layer.regrow_count >= 1


def test_flat_mask_only_for_uneven_layouts():
    from gatekv.cache import CompressedLayer

    layer = CompressedLayer(reserve=2)
    layer.append(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.arange(6)[None])
    assert layer.flat_mask() is None  # equal lengths at one stride: the strided-view SDPA path
    layer.compact(torch.arange(6).expand(1, 2, 6), torch.tensor([[2, 5]]))
    assert layer.flat_mask() is not None
    layer.compact(torch.arange(6).expand(1, 2, 6), torch.tensor([[0, 2]]))
    assert layer.flat_mask() is None  # an empty segment: the per-segment path gives it zeros


def test_flat_decode_windows_on_random_layouts():
    """Random uneven layouts (long or short first heads, uneven room): the windowed flat path equals the reference,
    and every window holds its head's segment inside the row's slots."""
    from gatekv.kernels.torch_ragged import _window

    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        batch, heads, group, d = 1 + seed % 2, 1 + seed % 4, 1 + seed % 3, 8
        lengths = torch.randint(1, 60, (batch * heads,), generator=g)
        caps = lengths + torch.randint(0, 20, (batch * heads,), generator=g)
        starts, rows = layout_from_caps(caps)
        keys, values = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
        positions = torch.full((rows,), -1, dtype=torch.long)
        for start, length in zip(starts.tolist(), lengths.tolist()):
            positions[start : start + length] = torch.arange(length)
        query = torch.randn(batch, heads * group, 1, d, generator=g)
        qpos = torch.full((batch, 1), 100)
        mask = FlatDecodeMask.build(starts, caps, lengths, batch, heads)
        expected = ragged_attention_reference(query, qpos, keys, values, positions, starts, lengths, 0.4)
        got = ragged_decode_unmasked(query, keys, values, starts.tolist(), lengths.tolist(), 0.4, flat_mask=mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for b in range(batch):
            lo = mask.row_start[b]
            segs = range(b * heads, (b + 1) * heads)
            rel = [int(starts[s]) - lo for s in segs]
            ends = [int(starts[s] + lengths[s]) - lo for s in segs]
            c, length = _window(rel, ends, mask.row_width[b])
            assert all(h * c <= rel[h] and ends[h] <= h * c + length for h in range(heads))
            assert (heads - 1) * c + length <= mask.row_width[b]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_torch_equals_reference(dtype):
    """The CPU window-attention path against the reference: left-padded keys (position -1), keys after a window
    query (causal), a padding query (position -1: zeros, not NaN), non-contiguous inputs, a scale that is not a
    power of two; and the dispatcher's auto backend takes it on CPU."""
    from gatekv import kernels
    from gatekv.kernels.reference import window_attention_reference
    from gatekv.kernels.torch_ragged import window_attention_torch

    g = torch.Generator().manual_seed(3)
    batch, kv_heads, group, w, t, d = 2, 3, 3, 5, 41, 16
    queries = torch.randn(batch, w, kv_heads * group, d, generator=g).to(dtype).transpose(1, 2)  # non-contiguous
    keys = torch.randn(batch, kv_heads, t, d, generator=g).to(dtype)
    key_positions = torch.arange(t).repeat(batch, kv_heads, 1)
    key_positions[0, 1, :7] = -1  # left padding of one head
    key_positions[1, :, :3] = -1
    window_positions = torch.arange(t - w, t).repeat(batch, 1)
    window_positions[1, 0] = -1  # a padding query
    scale = 0.3
    expected = window_attention_reference(queries, window_positions, keys, key_positions, scale)
    got = window_attention_torch(queries, window_positions, keys, key_positions, scale)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(got[1, :, 0]) == 0  # the padding query sees nothing
    assert torch.count_nonzero(got[0, 3:6, :, :7]) == 0  # query heads of KV head 1 never see its padding
    assert torch.count_nonzero(got[0, :, 0, t - w + 1:]) == 0  # the first window query does not see later keys
    torch.testing.assert_close(got.sum(-1)[0], torch.ones(kv_heads * group, w), atol=1e-5, rtol=0)
    dispatched = kernels.window_attention(queries, window_positions, keys, key_positions, scale)
    torch.testing.assert_close(dispatched, got, atol=0, rtol=0)


def test_flat_order_gives_the_shortest_window():
    """Each row's heads are laid out in the order whose flat window is shortest: no other order of that row is
    shorter, the example of the docstring reaches the longest segment, equal lengths and heads > 4 keep head order,
    and rows stay together and in order."""
    import itertools

    from gatekv.kernels.torch_ragged import FLAT_MAX_HEADS, flat_order
    from gatekv.kernels.torch_ragged import window_in_order as window

    lengths = [492, 985, 986]
    caps = [n + 64 for n in lengths]
    assert window(caps, lengths, [0, 1, 2]) == 1479
    order = flat_order(caps, lengths, 3)
    assert window(caps, lengths, order) == max(lengths)
    assert flat_order([10, 10, 10], [7, 7, 7], 3) is None
    assert flat_order([5] * 5, [1, 2, 3, 4, 5], 5) is None
    assert flat_order([5, 9], [5, 9], 1) is None
    g = torch.Generator().manual_seed(0)
    for heads in (2, 3, 4):
        for _ in range(20):
            batch = 2
            lengths = torch.randint(1, 80, (batch * heads,), generator=g).tolist()
            caps = [n + int(r) for n, r in zip(lengths, torch.randint(0, 10, (batch * heads,), generator=g))]
            order = flat_order(caps, lengths, heads) or list(range(batch * heads))
            for b in range(batch):
                row = order[b * heads:(b + 1) * heads]
                assert sorted(row) == list(range(b * heads, (b + 1) * heads))
                local = [s - b * heads for s in row]
                row_caps, row_lengths = caps[b * heads:(b + 1) * heads], lengths[b * heads:(b + 1) * heads]
                got = window(row_caps, row_lengths, local)
                assert got == min(window(row_caps, row_lengths, list(p)) for p in itertools.permutations(range(heads)))
                assert got >= max(row_lengths)
    assert FLAT_MAX_HEADS == 4


def test_layout_from_caps_in_a_given_order():
    caps = torch.tensor([3, 5, 2, 4])
    starts, rows = layout_from_caps(caps, [2, 0, 3, 1])
    assert rows == 14
    assert starts.tolist() == [2, 9, 0, 5]  # segment 2 first, then 0, 3, 1, one after another
    assert layout_from_caps(caps, [0, 1, 2, 3])[0].tolist() == layout_from_caps(caps)[0].tolist()
    for bad in ([0, 0, 1, 2], [0, 1, 2], [1, 2, 3, 4]):
        with pytest.raises(ValueError, match="permutation"):
            layout_from_caps(caps, bad)


def test_flat_decode_over_segments_in_any_order():
    """Rows whose heads lie in memory in any order: the flat path equals the reference, and mask row j opens exactly
    the slots of the row's j-th segment in memory."""
    import itertools

    for seed, perm in enumerate(itertools.permutations(range(3))):
        g = torch.Generator().manual_seed(seed)
        batch, heads, group, d = 2, 3, 2, 8
        lengths = torch.randint(1, 50, (batch * heads,), generator=g)
        caps = lengths + torch.randint(0, 6, (batch * heads,), generator=g)
        order = [b * heads + h for b in range(batch) for h in (perm if b == 0 else reversed(perm))]
        starts, rows = layout_from_caps(caps, order)
        keys, values = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
        positions = torch.full((rows,), -1, dtype=torch.long)
        for start, length in zip(starts.tolist(), lengths.tolist()):
            positions[start : start + length] = torch.arange(length)
        query = torch.randn(batch, heads * group, 1, d, generator=g)
        mask = FlatDecodeMask.build(starts, caps, lengths, batch, heads)
        assert mask.order[0] == list(perm) and mask.order[1] == list(reversed(perm))
        expected = ragged_attention_reference(query, torch.full((batch, 1), 100), keys, values, positions, starts,
                                              lengths, 0.4)
        got = ragged_decode_unmasked(query, keys, values, starts.tolist(), lengths.tolist(), 0.4, flat_mask=mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        for b in range(batch):
            for j, h in enumerate(mask.order[b]):
                s = b * heads + h
                opened = (mask.bias[b, j] == 0).nonzero().flatten() + mask.row_start[b]
                assert opened.tolist() == list(range(int(starts[s]), int(starts[s] + lengths[s])))


def test_cache_lays_uneven_heads_out_for_short_windows():
    """After an uneven compaction the cache lays the row's heads out in flat_order's order (not head order here),
    its decode appends keep the mask equal to a fresh one, and decode equals the reference."""
    from gatekv.cache import CompressedLayer

    layer = CompressedLayer(reserve=4)
    g = torch.Generator().manual_seed(1)
    heads, d, prompt = 3, 8, 40
    layer.append(torch.randn(1, heads, prompt, d, generator=g), torch.randn(1, heads, prompt, d, generator=g),
                 torch.arange(prompt)[None])
    counts = torch.tensor([[12, 30, 31]])
    layer.compact(torch.arange(prompt).expand(1, heads, prompt), counts, reserve=4)
    starts = layer.starts.tolist()
    assert sorted(range(heads), key=lambda h: starts[h]) != [0, 1, 2]
    mask = layer.flat_mask()
    assert mask.row_window(0, starts, counts.reshape(-1).tolist())[1] == 31
    for step in range(6):  # crosses a regrowth (room 4)
        layer.append(torch.randn(1, heads, 1, d, generator=g), torch.randn(1, heads, 1, d, generator=g),
                     torch.tensor([[prompt + step]]))
        mask = layer.flat_mask()
        fresh = FlatDecodeMask.build(layer.starts, layer.caps, layer.lengths, 1, heads)
        assert torch.equal(mask.bias, fresh.bias) and mask.order == fresh.order
        query = torch.randn(1, heads * 2, 1, d, generator=g)
        expected = ragged_attention_reference(query, torch.tensor([[prompt + step]]), layer.keys, layer.values,
                                              layer.positions, layer.starts, layer.lengths, 0.5)
        got = ragged_decode_unmasked(query, layer.keys, layer.values, *layer.host_layout(), 0.5, flat_mask=mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert layer.regrow_count >= 1


@pytest.mark.parametrize("case", ["prompt", "observers_after_keys", "shuffled_slots", "one_row_padded"])
def test_window_attention_torch_masks_only_what_it_must(case):
    """The layouts the CPU window attention meets: a prompt's own window (the last w slots masked causally), query
    observers after every key (nothing masked), slots out of position order with evicted holes (decode_budget
    refills; the masked columns start at the first unseen slot), a batch whose other row is padded: equal to the
    reference, every row summing to 1 or (a padding query) 0."""
    from gatekv.kernels.reference import window_attention_reference
    from gatekv.kernels.torch_ragged import window_attention_torch

    g = torch.Generator().manual_seed(7)
    batch, kv_heads, group, w, t, d = 2, 2, 3, 6, 50, 8
    queries = torch.randn(batch, kv_heads * group, w, d, generator=g)
    keys = torch.randn(batch, kv_heads, t, d, generator=g)
    key_positions = torch.arange(t).repeat(batch, kv_heads, 1)
    window_positions = torch.arange(t - w, t).repeat(batch, 1)
    if case == "observers_after_keys":
        window_positions = window_positions + w
    elif case == "shuffled_slots":
        for b in range(batch):
            for h in range(kv_heads):
                perm = torch.randperm(t, generator=g)
                key_positions[b, h] = torch.arange(0, 2 * t, 2)[perm]  # holes, out of order
        window_positions = torch.arange(2 * t - w, 2 * t).repeat(batch, 1) - 40
    elif case == "one_row_padded":
        key_positions[1, :, :4] = -1
        window_positions[1, :2] = -1
    expected = window_attention_reference(queries, window_positions, keys, key_positions, 0.35)
    got = window_attention_torch(queries, window_positions, keys, key_positions, 0.35)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    sums = got.sum(-1)
    padding = (window_positions < 0)[:, None, :].expand_as(sums)
    torch.testing.assert_close(sums[~padding], torch.ones_like(sums[~padding]), atol=1e-5, rtol=0)
    assert not bool(torch.isnan(got).any()) and bool((sums[padding] == 0).all())
