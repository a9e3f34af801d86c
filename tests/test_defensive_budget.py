"""defensive_budget: Layer-DefensiveKV's per-head counts, filled by the session's scorer. With DefensiveKV's own scores
it is Layer-DefensiveKV (the global allocator); with another scorer it keeps exactly Layer-DefensiveKV's counts and
that scorer's top slots; generation equals the masked reference; bad options name the option."""

from __future__ import annotations

import pytest
import torch

from gatekv import compress, get_allocator, get_scorer
from gatekv.compress import shared_prefill
from gatekv.allocators import Allocator, available_allocators
from gatekv.allocators.global_topk import plan_exact_counts
from gatekv.models import cache_kwarg
from test_compress import check_against_reference, generate
from tiny_models import FAMILIES, random_batch, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


class _FixedCounts(Allocator):
    """Keeps exactly the given per-layer (B, H_kv) counts, ranked by the session's scores."""

    def __init__(self, counts):
        self.counts = counts

    def allocate(self, inputs):
        return plan_exact_counts(inputs, self.counts)


def _prefill(model, scorer, allocator, ids, mask, **options):
    with torch.no_grad(), compress(model, scorer, allocator, budget=0.3, window=4, sinks=2, record=True,
                                   **options) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
    return cache, session.stats.events


def _kept(events):
    return [[p.clone() for p in e.kept_positions] for e in events]


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
def test_with_defensivekv_scores_it_is_layer_defensivekv(llama, prefill):
    ids, mask = random_batch(2, 70, pad=[0, 9], seed=4)
    options = dict(prefill=prefill, chunk_size=24)
    _, reference = _prefill(llama, "defensivekv", get_allocator("global"), ids, mask, **options)
    _, events = _prefill(llama, "defensivekv", "defensive_budget", ids, mask, **options)
    assert len(events) == len(reference) >= 1
    for got, expected in zip(_kept(events), _kept(reference)):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_other_scorer_keeps_layer_defensivekv_counts_and_its_own_top(llama):
    ids, mask = random_batch(2, 70, pad=[0, 9], seed=5)
    guide_cache, _ = _prefill(llama, "defensivekv", get_allocator("global"), ids, mask)
    counts = list(guide_cache.kept_tokens())
    assert len({int(c) for layer in counts for c in layer.flatten()}) > 1, "the global allocation is uneven"
    expected_cache, expected = _prefill(llama, "knorm", _FixedCounts(counts), ids, mask)
    cache, events = _prefill(llama, "knorm", "defensive_budget", ids, mask)
    assert torch.equal(cache.kept_tokens(), guide_cache.kept_tokens())
    for a, b in zip(events[0].kept_positions, expected[0].kept_positions):
        assert torch.equal(a, b)
    # and it is not simply the guide's choice of slots
    _, guide_events = _prefill(llama, "defensivekv", get_allocator("global"), ids, mask)
    assert any(not torch.equal(a, b) for a, b in zip(events[0].kept_positions, guide_events[0].kept_positions))


@pytest.mark.parametrize("options", [dict(prefill="one_shot"), dict(prefill="chunked", chunk_size=32),
                                     dict(prefill="one_shot", decode_budget=30)])
def test_generation_matches_masked_reference(llama, options):
    ids, mask = random_batch(3, 90, pad=[0, 7, 19], seed=7)
    with compress(llama, "tova", "defensive_budget", budget=0.25, window=6, sinks=2, record=True, **options) as session:
        sequences, logits = generate(llama, ids, mask)
    if "decode_budget" in options:
        assert [e.kind for e in session.stats.events].count("decode") >= 1
    check_against_reference(llama, ids, mask, sequences, logits, session)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_other_families_match_masked_reference(family):
    """Qwen2 (biases), Qwen3 (q/k norms), Mistral and Phi-3 (fused qkv): counts from each layer's window attention,
    one-shot and chunked, left padding."""
    model = tiny_model(family)
    ids, mask = random_batch(2, 80, pad=[0, 11], seed=8)
    uneven = []
    for options in (dict(prefill="one_shot"), dict(prefill="chunked", chunk_size=30)):
        with compress(model, "knorm", "defensive_budget", budget=0.3, window=5, sinks=2, record=True,
                      **options) as session:
            sequences, logits = generate(model, ids, mask)
        last = [e for e in session.stats.events if e.kind != "decode"][-1]
        uneven.append(len(set(last.kept_tokens[:, 1].flatten().tolist())) > 1)  # unpadded row, whole prompt
        check_against_reference(model, ids, mask, sequences, logits, session)
    assert any(uneven), f"{family}: every (layer, head) kept the same count"


def test_refused_on_a_shared_prefill(llama):
    ids, _ = random_batch(1, 60, seed=9)
    with torch.no_grad(), shared_prefill(llama, {"knorm": "knorm"}, window=4, sinks=2) as shared:
        shared.prefill(ids)
        with pytest.raises(ValueError, match="observes the prefill itself"):
            shared.fork("knorm", "defensive_budget", 0.3)
        cache, _ = shared.fork("knorm", "adakv", 0.3)  # the refusal left the shared prefill usable
        assert int(cache.kept_tokens().sum()) > 0


@pytest.mark.parametrize("options, field", [({"floor": 1.5}, "floor"), ({"kernel_size": 0}, "kernel_size"),
                                            ({"pooling": "median"}, "pooling")])
def test_bad_options_name_the_option(options, field):
    assert "defensive_budget" in available_allocators()
    with pytest.raises(ValueError, match=f"defensive_budget: {field}"):
        get_allocator("defensive_budget", **options)


class _AdaKVWithin(Allocator):
    """Each layer keeps the given per-row totals, split among its heads by Ada-KV on the session's scores."""

    def __init__(self, totals, alpha):
        self.totals, self.alpha = totals, alpha

    def allocate(self, inputs):
        from gatekv.allocators.adakv import adakv_counts

        counts = [adakv_counts(s, p, t, self.alpha) for s, p, t in zip(inputs.scores, inputs.protected, self.totals)]
        return plan_exact_counts(inputs, counts)


def test_guide_share_splits_each_layer_total_by_adakv_on_the_guide(llama):
    """guide_share = 1: every layer keeps Layer-DefensiveKV's total, split among its heads as Ada-KV splits it on the
    count guide: the rank mix's ``guide`` member's raw scores, or the session's scores when the scorer names none.
    guide_share = 0.5 lands between the two splits with the same totals."""
    ids, mask = random_batch(2, 70, pad=[0, 9], seed=5)
    mix = {"scorers": {"norm": "knorm", "tova": "tova"}, "guide": "tova"}
    plain, _ = _prefill(llama, get_scorer("rank_mix", **mix), "defensive_budget", ids, mask)
    totals = plain.kept_tokens().sum(-1)  # (layers, B)
    expected, _ = _prefill(llama, "tova", _AdaKVWithin(list(totals), 0.2), ids, mask)
    assert not torch.equal(expected.kept_tokens(), plain.kept_tokens()), "the two splits differ on this input"
    guided, _ = _prefill(llama, get_scorer("rank_mix", **mix), get_allocator("defensive_budget", guide_share=1.0),
                         ids, mask)
    assert torch.equal(guided.kept_tokens(), expected.kept_tokens())
    own, _ = _prefill(llama, "tova", get_allocator("defensive_budget", guide_share=1.0), ids, mask)
    assert torch.equal(own.kept_tokens(), expected.kept_tokens())
    half, _ = _prefill(llama, get_scorer("rank_mix", **mix), get_allocator("defensive_budget", guide_share=0.5),
                       ids, mask)
    assert torch.equal(half.kept_tokens().sum(-1), totals)
    low = torch.minimum(plain.kept_tokens(), expected.kept_tokens())
    high = torch.maximum(plain.kept_tokens(), expected.kept_tokens())
    assert bool(((half.kept_tokens() >= low - 1) & (half.kept_tokens() <= high + 1)).all())
    assert not torch.equal(half.kept_tokens(), plain.kept_tokens())


def test_guide_options_are_checked():
    with pytest.raises(ValueError, match="defensive_budget: guide_share"):
        get_allocator("defensive_budget", guide_share=1.5)
    with pytest.raises(ValueError, match="defensive_budget: guide_alpha"):
        get_allocator("defensive_budget", guide_alpha=-0.1)
    with pytest.raises(ValueError, match="rank_mix: guide must be one of"):
        get_scorer("rank_mix", scorers={"norm": "knorm", "tova": "tova"}, guide="snapkv")


def test_a_defensivekv_member_and_the_allocator_share_one_computation_per_layer(monkeypatch):
    """The guided blend (a DefensiveKV member, defensive_budget): DefensiveKV's pooled window scores are computed once
    per scored layer (the LayerContext caches them), not once for the member and once for the counts; the kept
    slots are those of the two separate computations."""
    from gatekv import window_scores
    from gatekv.allocators import defensive_budget
    from gatekv.allocators.defensive_budget import DefensiveBudgetAllocator
    from gatekv.scorers.rank_mix import RankMixScorer
    from tiny_models import random_batch, tiny_model

    model = tiny_model("llama")
    ids, mask = random_batch(2, 90, pad=[0, 12], seed=4)

    def kept(share: bool):
        calls = []
        real = window_scores.defensive_scores

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(window_scores, "defensive_scores", counting)
        monkeypatch.setattr(defensive_budget, "defensive_scores", counting)
        if not share:  # the old path: the allocator computes its own from the window attention
            from gatekv.allocators.base import Allocator

            monkeypatch.setattr(DefensiveBudgetAllocator, "observe_context", Allocator.observe_context)
        mix = RankMixScorer({"dkv": "defensivekv", "tova": "tova"}, {"dkv": 0.5, "tova": 0.5})
        with torch.no_grad(), compress(model, scorer=mix, allocator=DefensiveBudgetAllocator(), budget=0.3, window=4,
                                       sinks=2, record=True) as session:
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): session.new_cache()})
        monkeypatch.undo()
        return len(calls), session.stats.events[0].kept_positions

    shared_calls, shared = kept(True)
    separate_calls, separate = kept(False)
    layers = model.config.num_hidden_layers
    assert shared_calls == layers and separate_calls == 2 * layers
    for a, b in zip(shared, separate):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [dict(prefill="chunked", chunk_size=32), dict(prefill="one_shot", decode_budget=20)])
def test_the_guided_bounded_blend_in_chunks_and_decode_evictions_matches_the_masked_reference(llama, options):
    """The setting to use (a rank mix with a guide and a prompt-bounded quota, defensive_budget with guide_share)
    through chunked prefill and decode evictions, left padding: every step observes a guide and the budget share,
    and the generated tokens and logits equal the masked reference of the kept slots."""
    ids, mask = random_batch(3, 90, pad=[0, 7, 19], seed=9)
    mix = get_scorer("rank_mix", scorers={"norm": "knorm", "dkv": "defensivekv", "tova": "tova"},
                     weights={"norm": 0.5, "dkv": 0.25, "tova": 0.25}, quota={"norm": 0.5},
                     quota_prompt={"norm": 0.05}, guide="norm")
    allocator = get_allocator("defensive_budget", guide_share=0.5)
    guides = []
    observe = allocator.observe_guide

    def recording(layer_idx, scores):
        guides.append(layer_idx)
        observe(layer_idx, scores)

    allocator.observe_guide = recording
    with compress(llama, mix, allocator, budget=0.25, window=6, sinks=2, record=True, **options) as session:
        sequences, logits = generate(llama, ids, mask)
    kinds = [e.kind for e in session.stats.events]
    steps = kinds.count("chunk") + kinds.count("prefill") + kinds.count("decode")
    assert kinds.count("chunk" if "chunk_size" in options else "decode") >= 1
    assert len(guides) == steps * llama.config.num_hidden_layers  # a guide for every scored layer of every step
    check_against_reference(llama, ids, mask, sequences, logits, session)
