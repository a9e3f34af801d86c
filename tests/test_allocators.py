"""Property tests for every allocator: counts, bounds, sortedness, protected tokens, padding."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekv.allocators import AllocationInput, get_allocator
from gatekv.allocators.base import round_preserving_sum


@st.composite
def allocation_inputs(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    layers = draw(st.integers(1, 4))
    t = draw(st.integers(2, 40))
    sinks = draw(st.integers(0, 3))
    window = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    pads = [draw(st.integers(0, t - 1)) for _ in range(batch)]
    ties = draw(st.booleans())
    scores, protected = [], []
    for _ in range(layers):
        s = torch.randn(batch, heads, t, generator=generator)
        if ties:
            s = s.round()
        slot = torch.arange(t)
        valid = slot[None, :] >= torch.tensor(pads)[:, None]  # (B, T) left padding
        first = torch.tensor(pads)[:, None]
        prot = valid & ((slot[None, :] - first < sinks) | (slot[None, :] >= t - window))
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        scores.append(s)
        protected.append(prot[:, None, :].expand(batch, heads, t).clone())
    lengths = torch.tensor([t - p for p in pads])
    low = torch.tensor([int(p[b, 0].sum()) for b, p in enumerate([protected[0]] * batch)])
    budget = torch.tensor([draw(st.integers(int(low[b]), int(lengths[b]))) for b in range(batch)])
    budget = torch.maximum(budget, torch.ones_like(budget))
    return AllocationInput(scores, protected, budget, window)


def check_plan_invariants(inputs, plan):
    for layer, (scores, protected) in enumerate(zip(inputs.scores, inputs.protected)):
        counts, indices = plan.counts[layer], plan.indices[layer]
        candidates = scores > float("-inf")
        assert bool((counts >= protected.sum(-1)).all())
        assert bool((counts <= candidates.sum(-1)).all())
        kept = plan.kept_mask(layer, scores.shape[-1])
        assert torch.equal(kept.sum(-1), counts)
        assert not bool((kept & ~candidates).any()), "padding or non-candidate kept"
        assert bool((kept | ~protected).all()), "protected token dropped"
        for b in range(counts.shape[0]):
            for h in range(counts.shape[1]):
                row = indices[b, h, : counts[b, h]]
                assert bool((row[1:] > row[:-1]).all()), "indices not sorted/unique"
                # the kept non-protected slots outrank the dropped ones
                free = candidates[b, h] & ~protected[b, h]
                kept_free = scores[b, h][kept[b, h] & free]
                dropped = scores[b, h][~kept[b, h] & free]
                if kept_free.numel() and dropped.numel():
                    assert float(kept_free.min()) >= float(dropped.max())


@settings(max_examples=60, deadline=None)
@given(allocation_inputs())
def test_uniform(inputs):
    plan = get_allocator("uniform").allocate(inputs)
    check_plan_invariants(inputs, plan)
    for layer, scores in enumerate(inputs.scores):
        candidates = (scores > float("-inf")).sum(-1)
        assert torch.equal(plan.counts[layer], torch.minimum(inputs.budget[:, None].expand_as(candidates), candidates))


@settings(max_examples=60, deadline=None)
@given(allocation_inputs(), st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_adakv(inputs, alpha):
    plan = get_allocator("adakv", alpha=alpha).allocate(inputs)
    check_plan_invariants(inputs, plan)
    for layer, scores in enumerate(inputs.scores):
        candidates = (scores > float("-inf")).sum(-1)
        heads = scores.shape[1]
        total = torch.minimum(inputs.budget * heads, candidates.sum(-1))
        assert torch.equal(plan.counts[layer].sum(-1), total), "per-head counts must sum to H * B"
        if alpha == 1.0:  # full safeguard = uniform whenever every head can take B
            can = (candidates >= inputs.budget[:, None]).all(-1)
            uniform = torch.minimum(inputs.budget[:, None].expand_as(candidates), candidates)
            assert torch.equal(plan.counts[layer][can], uniform[can])


def test_adakv_moves_budget_to_the_peaked_head():
    scores = torch.full((1, 2, 20), -5.0)
    scores[0, 0, :] = torch.linspace(10, 5, 20)  # head 0: everything important
    inputs = AllocationInput([scores], [torch.zeros(1, 2, 20, dtype=torch.bool)], torch.tensor([6]), 0)
    counts = get_allocator("adakv", alpha=0.2).allocate(inputs).counts[0][0]
    # greedy picks all 12 from head 0: b_0 = 0.8 * 12 + 0.2 * 6 = 10.8 -> 11, b_1 = 1.2 -> 1
    assert counts.tolist() == [11, 1]


@settings(max_examples=60, deadline=None)
@given(allocation_inputs(), st.sampled_from([1.0, 5.0, 20.0]))
def test_pyramid(inputs, beta):
    plan = get_allocator("pyramid", beta=beta).allocate(inputs)
    check_plan_invariants(inputs, plan)
    for b in range(inputs.budget.shape[0]):
        per_layer = [int(c[b].max()) for c in plan.counts]
        assert per_layer == sorted(per_layer, reverse=True), "pyramid budgets must not grow with depth"


def test_pyramid_schedule_matches_formula():
    layers, t, window = 5, 100, 4
    scores = [torch.randn(1, 2, t) for _ in range(layers)]
    protected = [torch.zeros(1, 2, t, dtype=torch.bool) for _ in range(layers)]
    inputs = AllocationInput(scores, protected, torch.tensor([24]), window)
    counts = [int(c[0, 0]) for c in get_allocator("pyramid", beta=20).allocate(inputs).counts]
    base = 24 - window
    low, high = base / 20, min(2 * base - base / 20, t - window)
    expected = [round(high - l * (high - low) / (layers - 1)) + window for l in range(layers)]
    assert counts == expected


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=10))
def test_round_preserving_sum(values):
    tensor = torch.tensor(values, dtype=torch.float64)
    total = round(sum(values))
    out = round_preserving_sum(tensor * (total / sum(values)) if sum(values) > 0 else tensor, total)
    assert int(out.sum()) == total
