"""Global, threshold, CAKE (cascade) and FairKV allocators: property tests and a compress() session each."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekv import compress
from gatekv.allocators import AllocationInput, get_allocator
from gatekv.allocators.cake import CakeAllocator, layer_preference, water_fill
from gatekv.allocators.fairkv import assign_heads, balance_report, contiguous_assignment, shard_loads
from test_allocators import allocation_inputs, check_plan_invariants
from test_compress import check_against_reference, generate
from tiny_models import random_batch, tiny_model


def _candidates(inputs):
    return [(s > float("-inf")).sum(-1) for s in inputs.scores]


# -- global ------------------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(allocation_inputs(), st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_global(inputs, floor):
    plan = get_allocator("global", floor=floor).allocate(inputs)
    check_plan_invariants(inputs, plan)
    cands = _candidates(inputs)
    layers, heads = len(inputs.scores), inputs.scores[0].shape[1]
    for b in range(inputs.budget.shape[0]):
        total = min(layers * heads * int(inputs.budget[b]), sum(int(c[b].sum()) for c in cands))
        assert sum(int(c[b].sum()) for c in plan.counts) == total, "total kept = sum of per-layer budgets"
        wanted = round(float(inputs.budget[b]) * floor)
        for layer, prot in enumerate(inputs.protected):
            floor_h = torch.minimum(torch.clamp(prot[b].sum(-1), min=wanted), cands[layer][b])
            assert bool((plan.counts[layer][b] >= floor_h).all()), "per-head floor violated"


def test_global_moves_budget_across_layers():
    # layer 0 scores dominate layer 1's: with no floor, the whole budget goes to layer 0
    scores = [torch.linspace(10, 5, 20).expand(1, 2, 20).clone(), torch.linspace(-5, -10, 20).expand(1, 2, 20).clone()]
    protected = [torch.zeros(1, 2, 20, dtype=torch.bool)] * 2
    inputs = AllocationInput(scores, protected, torch.tensor([5]), 0)
    counts = get_allocator("global", floor=0.0).allocate(inputs).counts
    assert counts[0].tolist() == [[10, 10]] and counts[1].tolist() == [[0, 0]]
    counts = get_allocator("global", floor=0.4).allocate(inputs).counts
    assert counts[0].tolist() == [[8, 8]] and counts[1].tolist() == [[2, 2]]


# -- threshold ---------------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(allocation_inputs(), st.sampled_from([-0.5, 0.0, 1.0]), st.booleans())
def test_threshold(inputs, tau, cap):
    plan = get_allocator("threshold", tau=tau, cap=cap).allocate(inputs)
    check_plan_invariants(inputs, plan)
    for layer, (scores, protected) in enumerate(zip(inputs.scores, inputs.protected)):
        above = (scores > tau) & (scores > float("-inf")) & ~protected
        expected = protected.sum(-1) + above.sum(-1)
        if cap:
            expected = torch.maximum(torch.minimum(expected, inputs.budget[:, None]), protected.sum(-1))
        assert torch.equal(plan.counts[layer], expected)
        kept = plan.kept_mask(layer, scores.shape[-1])
        if not cap:
            assert torch.equal(kept & ~protected, above), "exactly the unprotected tokens above tau are kept"


@settings(max_examples=30, deadline=None)
@given(allocation_inputs(), st.integers(0, 2**16))
def test_threshold_per_layer_taus(inputs, seed):
    g = torch.Generator().manual_seed(seed)
    taus = (torch.rand(len(inputs.scores), generator=g) * 2 - 1).tolist()
    plan = get_allocator("threshold", tau=taus).allocate(inputs)
    check_plan_invariants(inputs, plan)
    for layer, (tau, scores, protected) in enumerate(zip(taus, inputs.scores, inputs.protected)):
        single = get_allocator("threshold", tau=tau).allocate(inputs)  # layer l alone decides with its own tau
        assert torch.equal(plan.counts[layer], single.counts[layer])
        above = (scores > tau) & (scores > float("-inf")) & ~protected
        assert torch.equal(plan.kept_mask(layer, scores.shape[-1]) & ~protected, above)
    with pytest.raises(ValueError, match="per-layer taus"):
        get_allocator("threshold", tau=taus + [0.0]).allocate(inputs)


@pytest.mark.parametrize(
    "name, options, field",
    [
        ("threshold", {"tau": float("nan")}, "tau"),
        ("threshold", {"tau": []}, "tau"),
        ("threshold", {"tau": [0.0, float("inf")]}, "tau"),
        ("threshold", {"tau": "0"}, "tau"),
        ("global", {"floor": 1.5}, "floor"),
        ("global", {"floor": -0.1}, "floor"),
        ("cake", {"tau1": 0}, "tau1"),
        ("cake", {"tau2": float("inf")}, "tau2"),
        ("fairkv", {"tp": 0}, "tp"),
    ],
)
def test_bad_hyperparameters(name, options, field):
    with pytest.raises(ValueError, match=field):
        get_allocator(name, **options)


# -- CAKE --------------------------------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(0, 10), min_size=1, max_size=8),
    st.lists(st.integers(0, 50), min_size=8, max_size=8),
    st.integers(0, 300),
)
def test_water_fill(preference, caps, total):
    n = len(preference)
    caps_t = torch.tensor(caps[:n])
    out = water_fill(torch.tensor(preference), total, caps_t)
    assert float(out.sum()) == pytest.approx(min(total, sum(caps[:n])), abs=1e-6)
    assert bool((out <= caps_t + 1e-9).all()) and bool((out >= 0).all())


def test_layer_preference_prefers_dispersed_shifting_attention():
    t = 16
    peaked = torch.zeros(1, 2, 4, t)
    peaked[..., 0] = 1.0  # every query on one token: zero entropy, zero variance
    spread = torch.softmax(torch.randn(1, 2, 4, t, generator=torch.Generator().manual_seed(0)), -1)
    assert float(layer_preference(peaked)) == pytest.approx(0.0)
    assert float(layer_preference(spread)) > 0


def _observed_cake(preferences, length, tau=1.0):
    cake = CakeAllocator(tau, tau)
    for layer, p in enumerate(preferences):
        cake._preference[layer] = torch.tensor([p], dtype=torch.float64)
        cake._length[layer] = torch.tensor([length])
    return cake


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 5), min_size=2, max_size=6), st.integers(10, 60), st.integers(0, 6), st.data())
def test_cake_budgets_and_cascade_are_nested(preferences, length, window, data):
    budget = data.draw(st.integers(window + 1, length))
    num_layers = len(preferences)
    cake = _observed_cake(preferences, length)
    inputs = AllocationInput([torch.randn(1, 2, length)] * num_layers, [torch.zeros(1, 2, length, dtype=torch.bool)] * num_layers, torch.tensor([budget]), window)
    final = cake.budgets(inputs)[0]
    assert int(final.sum()) == min(num_layers * (budget - window), num_layers * (length - window))
    assert bool((final <= length - window).all())
    previous = None
    for m in range(1, num_layers + 1):
        prefix = AllocationInput(inputs.scores[:m], inputs.protected[:m], inputs.budget, window)
        stage = cake.budgets(prefix, num_layers, final=m == num_layers)[0]
        assert int(stage.sum()) <= num_layers * (budget - window) + m, "cascade holds at most B_total (+ rounding)"
        if previous is not None:
            assert bool((stage[:-1] <= previous).all()), "cascade budgets never grow: re-eviction can realise them"
        previous = stage
    assert torch.equal(previous, final), "last cascade stage = non-cascade CAKE budgets"


class _NoCascadeCake(CakeAllocator):
    cascade = False


@pytest.fixture(scope="module")
def deep_llama():
    """A 4-layer tiny Llama (the cascade bound matters with several layers)."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 4
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
def test_cake_cascade_session(deep_llama, prefill):
    model = deep_llama
    ids, mask = random_batch(2, 96, pad=[0, 13], seed=4)
    options = dict(budget=0.3, prefill=prefill, chunk_size=32, window=6, sinks=0, record=True, reserve=8)
    with compress(model, "snapkv", CakeAllocator(), **options) as cascade:
        sequences, logits = generate(model, ids, mask)
    check_against_reference(model, ids, mask, sequences, logits, cascade)
    with compress(model, "snapkv", _NoCascadeCake(), **options) as plain:
        generate(model, ids, mask)
    if prefill == "one_shot":  # the paper's setting: same final eviction as the non-cascade CAKE (nested budgets)
        for ours, theirs in zip(cascade.stats.events[0].kept_positions, plain.stats.events[0].kept_positions):
            assert torch.equal(ours, theirs)
    # peak memory: B_total (+ one rounding token per layer and head) + the new tokens of the layer being prefilled
    # (+ the growth room ``reserve`` of every segment)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    token_bytes = config.num_key_value_heads * 2 * head_dim * 4  # K and V, float32, all heads of a row
    layers = config.num_hidden_layers
    step = ids.shape[1] if prefill == "one_shot" else options["chunk_size"]
    per_row = [(int(b) + 1) * layers + step + options["reserve"] * (layers + 1) for b in cascade.stats.budget_tokens]
    bound = sum(per_row) * token_bytes
    assert cascade.stats.cascade_peak_kv_bytes > 0
    assert cascade.stats.peak_kv_bytes <= bound
    if prefill == "one_shot":
        assert cascade.stats.peak_kv_bytes < plain.stats.peak_kv_bytes


# -- FairKV ------------------------------------------------------------------------------------------------------
def test_fairkv_tp_must_divide_heads():
    inputs = AllocationInput([torch.randn(1, 3, 10)], [torch.zeros(1, 3, 10, dtype=torch.bool)], torch.tensor([4]), 0)
    with pytest.raises(ValueError, match="tp"):
        get_allocator("fairkv", tp=2).allocate(inputs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 100), min_size=8, max_size=8), st.sampled_from([1, 2, 4, 8]))
def test_lpt_assignment(loads, tp):
    loads = torch.tensor(loads)
    assignment = assign_heads(loads, tp)
    assert torch.equal(torch.bincount(assignment, minlength=tp), torch.full((tp,), 8 // tp))
    counts = [loads[None]]
    after = shard_loads(counts, [assignment], tp).max()
    before = shard_loads(counts, [contiguous_assignment(8, tp)], tp).max()
    report = balance_report(counts, tp)
    assert report["after"] >= 1.0 - 1e-9
    if tp in (1, 8):
        assert float(after) == float(before)


@settings(max_examples=30, deadline=None)
@given(allocation_inputs(), st.booleans())
def test_fairkv_wraps_inner(inputs, rebalance):
    heads = inputs.scores[0].shape[1]
    tp = 2 if heads % 2 == 0 else 1
    allocator = get_allocator("fairkv", tp=tp, inner="adakv", rebalance=rebalance, alpha=0.2)
    plan = allocator.allocate(inputs)
    check_plan_invariants(inputs, plan)
    inner = get_allocator("adakv", alpha=0.2).allocate(inputs)
    for ours, theirs in zip(plan.counts, inner.counts):
        if not rebalance:
            assert torch.equal(ours, theirs)
    assert len(allocator.last_assignment) == len(inputs.scores)


@pytest.mark.parametrize("budget", [1.0, 0.5])
def test_threshold_compresses_whatever_the_budget(deep_llama, budget):
    """The threshold allocator (no cap) decides the kept amount itself: a budget covering the prompt (1.0) is no
    no-op for it; a tau above every score keeps exactly the protected sinks + window of each head. With cap=True
    the budget rules again, and 1.0 leaves the prompt whole."""
    ids = torch.randint(4, 100, (1, 80), generator=torch.Generator().manual_seed(2))
    with compress(deep_llama, "snapkv", get_allocator("threshold", tau=1e9), budget=budget, window=6, sinks=2) as session:
        deep_llama(input_ids=ids)
    assert not session.stats.noop
    kept = session.stats.events[0].kept_tokens
    assert bool((kept == 8).all())  # 2 sinks + 6 window tokens per head
    with compress(deep_llama, "snapkv", get_allocator("threshold", tau=1e9, cap=True), budget=1.0, window=6,
                  sinks=2) as capped:
        deep_llama(input_ids=ids)
    assert capped.stats.noop
