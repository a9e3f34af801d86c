"""In-place decode eviction (decode_budget): same kept tokens as a compaction, O(dropped) movement, same buffers."""

from __future__ import annotations

import pytest
import torch

from gatekv import compress, kernels
from gatekv.cache import CompressedLayer
from gatekv.kernels.reference import compact_reference, evict_in_place_reference, layout_from_caps
from tiny_models import random_batch, tiny_model


def _segments_sorted(buffers, starts, lengths, order_by=2):
    """Per segment, its filled rows of every buffer, sorted by position (buffers[order_by])."""
    out = []
    for start, length in zip(starts.tolist(), lengths.tolist()):
        rows = torch.arange(start, start + length)
        order = torch.argsort(buffers[order_by][rows], stable=True)
        out.append([buf[rows][order] for buf in buffers])
    return out


@pytest.mark.parametrize("seed", range(4))
def test_evict_in_place_keeps_exactly_what_compaction_keeps(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 1, 7, 12, 5, 12])
    caps = lengths + torch.tensor([0, 2, 1, 0, 3, 4])
    starts, rows = layout_from_caps(caps)
    keys = torch.randn(rows, 8, generator=g)
    values = torch.randn(rows, 8, dtype=torch.float64, generator=g)
    positions = torch.randperm(rows, generator=g)  # distinct, in no particular order (earlier in-place evictions)
    state = torch.randn(rows, generator=g)
    k_max = int(lengths.max())
    counts = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=g)[0] for n in lengths])
    indices = torch.zeros(len(lengths), k_max, dtype=torch.long)
    for s, (n, c) in enumerate(zip(lengths.tolist(), counts.tolist())):
        indices[s, :c] = torch.sort(torch.randperm(n, generator=g)[:c]).values
    buffers = [keys, values, positions, state]
    dst_starts, dst_rows = layout_from_caps(counts)
    expected = compact_reference(buffers, starts, indices, counts, dst_starts, dst_rows, [0, 0, -1, 0])
    moved = [b.clone() for b in buffers]
    kernels.evict_in_place(moved, starts, lengths, indices, counts)
    got = _segments_sorted(moved, starts, counts)
    want = _segments_sorted(expected, dst_starts, counts)
    for got_segment, want_segment in zip(got, want):
        for a, b in zip(got_segment, want_segment):
            assert torch.equal(a, b)  # data movement: exact
    # rows outside the kept slots of each segment are untouched only where nothing moved in: kept slots below
    # counts never move
    for s, (start, c) in enumerate(zip(starts.tolist(), counts.tolist())):
        kept_low = [i for i in indices[s, :c].tolist() if i < c]
        for i in kept_low:
            assert torch.equal(moved[0][start + i], keys[start + i])


@pytest.mark.parametrize("seed", range(6))
def test_one_eviction_per_segment_moves_the_last_slot_into_the_hole(seed):
    """The decode_budget step (every segment drops exactly one slot, kept indices in any order): the segment's last
    slot moves into the dropped one (nothing moves when the last slot is the dropped one), every other slot stays;
    the moves the general path makes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (5,), generator=g)
    starts, rows = layout_from_caps(lengths + 2)
    keys = torch.randn(rows, 4, generator=g)
    positions = torch.arange(rows)
    dropped = [int(torch.randint(0, int(n), (1,), generator=g)) for n in lengths]
    dropped[0] = int(lengths[0]) - 1  # one segment drops its last slot
    k_max = int(lengths.max()) - 1
    indices = torch.zeros(len(lengths), max(k_max, 1), dtype=torch.long)
    for s, (n, d) in enumerate(zip(lengths.tolist(), dropped)):
        kept = [i for i in range(n) if i != d]
        indices[s, : len(kept)] = torch.tensor(kept, dtype=torch.long)[torch.randperm(len(kept), generator=g)]
    moved = [keys.clone(), positions.clone()]
    evict_in_place_reference(moved, starts, lengths, indices, lengths - 1)
    expected = [keys.clone(), positions.clone()]
    for s, (start, n, d) in enumerate(zip(starts.tolist(), lengths.tolist(), dropped)):
        for buf in expected:
            buf[start + d] = buf[start + n - 1]
    for got, want in zip(moved, expected):
        assert torch.equal(got, want)
    # the first n - 1 slots of each segment hold exactly its kept tokens
    for s, (start, n, d) in enumerate(zip(starts.tolist(), lengths.tolist(), dropped)):
        kept = set(range(n)) - {d}
        held = set(moved[1][start : start + n - 1].tolist())
        assert held == {start + i for i in kept}


def test_evict_in_place_edge_cases():
    starts, rows = layout_from_caps(torch.tensor([3, 3]))
    keys = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    lengths = torch.tensor([3, 3])
    # keep all / keep none: nothing moves
    for counts, indices in ((torch.tensor([3, 3]), torch.arange(3).repeat(2, 1)), (torch.tensor([0, 0]), torch.zeros(2, 3, dtype=torch.long))):
        moved = [keys.clone()]
        evict_in_place_reference(moved, starts, lengths, indices, counts)
        assert torch.equal(moved[0], keys)
    # drop slot 0 of a full segment: the last slot moves into it
    moved = [keys.clone()]
    evict_in_place_reference(moved, starts, lengths, torch.tensor([[1, 2, 0], [0, 1, 2]]), torch.tensor([2, 3]))
    assert torch.equal(moved[0][0], keys[2]) and torch.equal(moved[0][1], keys[1])
    with pytest.raises(ValueError, match="indices"):
        kernels.evict_in_place([keys], starts, lengths, torch.zeros(3, 3, dtype=torch.long), torch.tensor([1, 1]))


@pytest.mark.parametrize("allocator", ["uniform", "adakv"])
def test_decode_budget_evicts_in_place_without_reallocating(allocator):
    model = tiny_model("qwen2")
    ids, mask = random_batch(2, 80, pad=[0, 6], seed=3)
    with compress(model, "h2o", allocator, budget=0.5, decode_budget=40, window=4, record=True) as session:
        model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    decode = [e for e in session.stats.events if e.kind == "decode"]
    assert len(decode) == 11
    for event in decode:
        assert event.kv_bytes_after == event.kv_bytes_before  # same buffers
        assert int(event.kept_tokens.sum(-1).max()) <= 40 * event.kept_tokens.shape[-1]
    if allocator == "uniform":
        assert session.cache.layers[0].regrow_count == 1  # the prefill's own allocation; none while decoding


def test_decode_budget_room_is_the_growth_up_to_the_budget_not_max_new_tokens():
    model = tiny_model("llama")
    ids, mask = random_batch(1, 80, seed=4)
    with compress(model, "tova", "uniform", budget=30, decode_budget=36, window=4) as session:
        model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    layer = session.cache.layers[0]
    # room for the 6 tokens before the budget is reached, not for all 39 generated ones (the rest refill in place)
    assert int(layer.caps.max()) <= 36 + 1
    assert int(layer.lengths.max()) <= 36


@pytest.mark.parametrize("interval", [1, 4])
def test_decode_interval_evicts_every_k_steps_back_to_the_budget(interval):
    """decode_interval k: each segment grows to decode_budget + k - 1 slots, the k-th step past it evicts back to
    decode_budget in place (same buffers); the logits equal the masked reference of the recorded evictions."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from masked_reference import reference_logits

    model = tiny_model("llama")
    ids, mask = random_batch(2, 60, pad=[0, 5], seed=5)
    new, budget = 17, 34
    with compress(model, "tova", "adakv", budget=30, decode_budget=budget, window=4, record=True,
                  decode_interval=interval) as session:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        caps = int(session.cache.layers[0].caps.max())
    decode = [e for e in session.stats.events if e.kind == "decode"]
    # the prompt keeps 30 per head: 4 tokens to the budget, then one eviction every `interval` steps
    steps_past = new - 1 - (budget - 30)  # decode forwards (the first token comes from the prefill) past the budget
    assert len(decode) == steps_past // interval
    for event in decode:
        assert event.kv_bytes_after == event.kv_bytes_before
        assert int(event.kept_tokens.sum(-1).max()) == budget * event.kept_tokens.shape[-1]  # back to the budget
    assert caps <= budget + interval  # the room is the growth past the prompt's budget + the interval
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
    ref = reference_logits(model, out.sequences[:, :-1], full_mask[:, :-1], session.stats.events, None)
    torch.testing.assert_close(torch.stack(out.logits, 1), ref[:, ids.shape[1] - 1:].float(), atol=1e-5, rtol=0)


def test_decode_interval_bad_input():
    from gatekv import CompressionConfig

    with pytest.raises(ValueError, match="decode_interval must be an int >= 1, got 0"):
        CompressionConfig(decode_budget=64, decode_interval=0)
    with pytest.raises(ValueError, match="decode_interval 8 needs decode_budget"):
        CompressionConfig(decode_interval=8)
