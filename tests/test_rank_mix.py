"""rank_mix: a weighted blend of several scorers' within-head rankings. The ranks equal a naive per-head sort; a mix
with one non-zero weight keeps exactly that scorer's slots; a real blend keeps what a per-slot naive blend ranks
highest; the trained heads mix with a training-free scorer; generation equals the masked reference; bad options are
named."""

from __future__ import annotations

import math

import pytest
import torch

from gatekv import compress, get_scorer
from gatekv.heads.retaining_head import RetainingHead
from gatekv.models import cache_kwarg
from gatekv.scorers import Scorer
from gatekv.scorers.rank_mix import RankMixScorer, within_head_ranks
from test_compress import check_against_reference, generate
from tiny_models import FAMILIES, random_batch, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _naive_ranks(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(scores, dtype=torch.float32)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            slots = [t for t in range(scores.shape[2]) if candidates[b, h, t]]
            ordered = sorted(slots, key=lambda t: (float(scores[b, h, t]), t))  # ascending, ties by slot
            for rank, t in enumerate(ordered):
                out[b, h, t] = rank / max(len(slots) - 1, 1)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_within_head_ranks_equal_a_naive_sort(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (2, 3, 17), generator=generator).float()  # many ties
    candidates = torch.rand(2, 3, 17, generator=generator) > 0.3
    candidates[0, 0] = False  # a head with no candidate
    candidates[1, 2] = False
    candidates[1, 2, 5] = True  # a head with one candidate
    scores[~candidates] = torch.randn(int((~candidates).sum()), generator=generator) * 100  # junk off-candidates
    assert torch.equal(within_head_ranks(scores, candidates), _naive_ranks(scores, candidates))


def _kept_positions(model, scorer, ids, mask):
    with torch.no_grad(), compress(model, scorer, "uniform", budget=0.3, window=4, sinks=2, record=True) as session:
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): session.new_cache()})
    return session.stats.events[0].kept_positions


def test_one_weight_keeps_that_scorers_slots(llama):
    ids, mask = random_batch(2, 70, pad=[0, 9], seed=3)
    expected = _kept_positions(llama, "knorm", ids, mask)
    got = _kept_positions(llama, get_scorer("rank_mix", scorers={"a": "knorm", "b": "snapkv"},
                                            weights={"a": 1.0, "b": 0.0}), ids, mask)
    other = _kept_positions(llama, "snapkv", ids, mask)
    assert any(not torch.equal(a, b) for a, b in zip(expected, other)), "the two scorers must disagree"
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


class _Recording(Scorer):
    """A scorer that keeps the scores and candidates of every layer it scored."""

    def __init__(self, scorer):
        self.inner, self.seen = get_scorer(scorer), {}

    def score(self, ctx):
        scores = self.inner.score(ctx)
        self.seen[ctx.layer_idx] = (scores.clone(), ctx.candidates.clone())
        return scores


class _RecordingMix(RankMixScorer):
    """The mix, keeping what it returned per layer."""

    def score(self, ctx):
        self.returned = getattr(self, "returned", {})
        self.returned[ctx.layer_idx] = super().score(ctx)
        return self.returned[ctx.layer_idx]


@pytest.mark.parametrize("combine, weights, quota", [("sum", (0.3, 0.7), {}), ("max", (0.3, 0.7), {}),
                                                     ("sum", (0.5, 0.5), {"k": 0.5}), ("sum", (0.0, 1.0), {"k": 1.0}),
                                                     ("max", (0.5, 0.5), {"k": 0.2, "t": 0.3})])
def test_blend_equals_a_naive_blend_of_ranks(llama, combine, weights, quota):
    ids, _ = random_batch(1, 64, seed=6)
    knorm, tova = _Recording("knorm"), _Recording("tova")
    mix = _RecordingMix({"k": knorm, "t": tova}, {"k": weights[0], "t": weights[1]}, combine, quota)
    _kept_positions(llama, mix, ids, torch.ones_like(ids))
    assert set(mix.returned) == set(range(llama.config.num_hidden_layers))
    for layer, mixed in mix.returned.items():
        (k_scores, candidates), (t_scores, _) = knorm.seen[layer], tova.seen[layer]
        ranks = {"k": _naive_ranks(k_scores, candidates), "t": _naive_ranks(t_scores, candidates)}
        k_ranks, t_ranks = weights[0] * ranks["k"], weights[1] * ranks["t"]
        expected = k_ranks + t_ranks if combine == "sum" else torch.maximum(k_ranks, t_ranks)
        if quota:
            rest = 1 - sum(quota.values())
            blend = (_naive_ranks(expected, candidates) - 1) / rest if rest > 0 else torch.full_like(expected, -math.inf)
            for label, share in quota.items():
                blend = torch.maximum(blend, (ranks[label] - 1) / share)
            expected = blend
        torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)


class _Fixed(Scorer):
    """A member whose scores are given."""

    def __init__(self, scores):
        self.scores = scores

    def score(self, ctx):
        return self.scores


class _Context:
    """The fields RankMixScorer.score() reads."""

    def __init__(self, scores, candidates, protected=None, budget_share=None):
        self.positions = self.keys = scores
        self.candidates, self.protected, self.budget_share = candidates, protected, budget_share


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8])
def test_a_quota_keeps_the_members_top_share_of_every_count(share):
    """Whatever count k an allocator keeps, its top k by the mix's scores hold the member's own top ~share * k."""
    generator = torch.Generator().manual_seed(int(share * 100))
    member, other = torch.rand(2, 3, 300, generator=generator), torch.rand(2, 3, 300, generator=generator)
    candidates = torch.rand(2, 3, 300, generator=generator) > 0.1
    out = RankMixScorer({"m": _Fixed(member), "o": _Fixed(other)}, {"m": 0.0, "o": 1.0}, quota={"m": share}).score(
        _Context(member, candidates))
    for k in (4, 10, 30, 100, 250):
        kept = out.masked_fill(~candidates, -math.inf).topk(k, dim=-1).indices
        own = member.masked_fill(~candidates, -math.inf).topk(int(share * (k - 2)), dim=-1).indices
        for b in range(2):
            for h in range(3):
                assert set(own[b, h].tolist()) <= set(kept[b, h].tolist()), (k, b, h)
        # and the other member gets the rest: its top (1 - share) * (k - 2) too
        rest = other.masked_fill(~candidates, -math.inf).topk(int((1 - share) * (k - 2)), dim=-1).indices
        assert all(set(rest[b, h].tolist()) <= set(kept[b, h].tolist()) for b in range(2) for h in range(3))


@pytest.mark.parametrize("share, prompt_share", [(0.5, 0.025), (0.3, 0.05), (0.8, 0.2)])
def test_a_prompt_quota_is_the_plain_quota_at_min_share_c_over_b_per_row(share, prompt_share):
    """quota_prompt={m: c}: at a budget of b of the tokens the member's share of every count is min(p, c / b), row by
    row: the scores equal a plain quota of that share on each row."""
    generator = torch.Generator().manual_seed(int(prompt_share * 1000))
    member, other = torch.rand(3, 3, 300, generator=generator), torch.rand(3, 3, 300, generator=generator)
    candidates = torch.rand(3, 3, 300, generator=generator) > 0.1
    members = {"m": _Fixed(member), "o": _Fixed(other)}
    mix = RankMixScorer(members, {"m": 0.5, "o": 0.5}, quota={"m": share}, quota_prompt={"m": prompt_share})
    assert mix.needs_budget and not RankMixScorer(members, {"m": 0.5, "o": 0.5}, quota={"m": share}).needs_budget
    budgets = torch.tensor([0.05, 0.1, 0.4], dtype=torch.float64)
    out = mix.score(_Context(member, candidates, budget_share=budgets))
    capped = 0
    for row, budget in enumerate(budgets.tolist()):
        effective = min(share, prompt_share / budget)
        capped += effective < share
        one_row = {"m": _Fixed(member[row : row + 1]), "o": _Fixed(other[row : row + 1])}
        plain = RankMixScorer(one_row, {"m": 0.5, "o": 0.5}, quota={"m": effective}).score(
            _Context(member[row : row + 1], candidates[row : row + 1]))
        torch.testing.assert_close(out[row : row + 1], plain, rtol=1e-6, atol=1e-6)
    assert capped >= 1  # the bound binds somewhere
    with pytest.raises(ValueError, match="quota_prompt needs the session's budget"):
        mix.score(_Context(member, candidates))


def test_the_session_tells_scorers_the_budget_share_of_each_step(llama):
    """LayerContext.budget_share: the prompt budget over the row's tokens in prefill (per row, left padding), the
    decode budget over the tokens so far at a decode eviction; None on a held (shared) prefill."""
    from gatekv import compress

    class Spy(_Fixed):
        def __init__(self):
            self.seen = []

        def score(self, ctx):
            self.seen.append(None if ctx.budget_share is None else ctx.budget_share.tolist())
            self.newest = (ctx.query_positions.amax(-1) + 1).tolist()  # tokens so far (positions start at 0)
            return ctx.positions.float()

    spy = Spy()
    ids, mask = random_batch(2, 80, pad=[0, 16], seed=5)
    with torch.no_grad(), compress(llama, scorer=spy, budget=0.25, window=4, sinks=2, decode_budget=22) as session:
        out = llama(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(llama): session.new_cache()})
        prefill_steps = len(spy.seen)
        cache, step_mask = out.past_key_values, mask
        for _ in range(4):  # the cache reaches the decode budget and evicts
            token = out.logits[:, -1:].argmax(-1)
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], -1)
            out = llama(input_ids=token, attention_mask=step_mask, use_cache=True, **{cache_kwarg(llama): cache})
    layers = llama.config.num_hidden_layers
    assert prefill_steps == layers
    assert spy.seen[0] == pytest.approx([20 / 80, 16 / 64])  # budget.tokens(80) = 20, (64) = 16
    assert len(spy.seen) > layers  # decode evictions scored
    assert spy.newest[0] > 80
    assert spy.seen[-1] == pytest.approx([22 / spy.newest[0], 22 / spy.newest[1]])  # 22 of the tokens so far
    held = Spy()
    from gatekv.compress import CompressionSession

    session = CompressionSession(llama, scorer=held, budget=0.25, window=4, sinks=2)
    session.hold_prefills()
    with torch.no_grad(), session.entered():
        llama(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(llama): session.new_cache()})
    assert held.seen and all(seen is None for seen in held.seen)


@pytest.mark.parametrize("share", [0.3, 0.5])
def test_a_free_quota_is_a_share_of_the_unprotected_slots(share):
    """quota_of="free": with the protected slots kept first, the next k - P slots by the mix's scores hold the
    member's own top share * (k - P) unprotected slots, however high the member ranks the protected ones (here it
    ranks them highest: with quota_of="count" they would take part of its share)."""
    generator = torch.Generator().manual_seed(int(share * 10))
    member, other = torch.rand(2, 3, 200, generator=generator), torch.rand(2, 3, 200, generator=generator)
    candidates = torch.ones(2, 3, 200, dtype=torch.bool)
    protected = torch.zeros_like(candidates)
    protected[..., -40:] = True
    member[..., -40:] += 10.0  # the member ranks the protected (recent) slots first
    members, weights = {"m": _Fixed(member), "o": _Fixed(other)}, {"m": 0.0, "o": 1.0}
    free = RankMixScorer(members, weights, quota={"m": share}, quota_of="free").score(
        _Context(member, candidates, protected))
    count = RankMixScorer(members, weights, quota={"m": share}).score(_Context(member, candidates, protected))
    unprotected_member = member.masked_fill(protected, -math.inf)
    for k in (60, 100, 150):
        extra = k - 40
        own = unprotected_member.topk(int(share * (extra - 2)), dim=-1).indices
        kept_free = free.masked_fill(protected, -math.inf).topk(extra, dim=-1).indices
        kept_count = count.masked_fill(protected, -math.inf).topk(extra, dim=-1).indices
        for b in range(2):
            for h in range(3):
                assert set(own[b, h].tolist()) <= set(kept_free[b, h].tolist()), (k, b, h)
        missed = sum(len(set(own[b, h].tolist()) - set(kept_count[b, h].tolist())) for b in range(2) for h in range(3))
        if k == 60:  # the default share of k (30) goes to the 40 protected slots the member ranks first
            assert missed > 0
    with pytest.raises(ValueError, match="protected"):
        RankMixScorer(members, weights, quota={"m": share}, quota_of="free").score(_Context(member, candidates))


def test_trained_heads_mix_with_a_training_free_scorer_and_match_the_reference(llama):
    torch.manual_seed(0)
    heads = RetainingHead.from_model(llama, hidden=8, recency_buckets=4)
    mix = get_scorer("rank_mix", scorers={"heads": heads, "dkv": "defensivekv"}, weights={"heads": 0.75, "dkv": 0.25})
    assert mix.needs == heads.needs and mix.state_names == heads.state_names
    ids, mask = random_batch(3, 90, pad=[0, 7, 19], seed=7)
    for options in (dict(prefill="one_shot"), dict(prefill="chunked", chunk_size=32)):
        with compress(llama, mix, "defensive_budget", budget=0.25, window=6, sinks=2, record=True,
                      **options) as session:
            sequences, logits = generate(llama, ids, mask)
        check_against_reference(llama, ids, mask, sequences, logits, session)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_quota_mix_matches_the_reference_in_every_family(family):
    """The shipped setting (heads + DefensiveKV, quota, defensive_budget) on each family, one-shot and with a fixed
    decode budget (each decode eviction re-ranks with both members), and with quota_of="free"; the logits equal the
    masked reference."""
    model = tiny_model(family)
    torch.manual_seed(1)
    heads = RetainingHead.from_model(model, hidden=8, recency_buckets=4)
    ids, mask = random_batch(2, 72, pad=[0, 9], seed=11)
    for quota_of, options in (("count", dict()), ("count", dict(decode_budget=24)), ("free", dict())):
        mix = get_scorer("rank_mix", scorers={"heads": heads, "dkv": "defensivekv"},
                         weights={"heads": 0.5, "dkv": 0.5}, quota={"heads": 0.5}, quota_of=quota_of)
        with compress(model, mix, "defensive_budget", budget=20, window=4, sinks=2, record=True,
                      **options) as session:
            sequences, logits = generate(model, ids, mask)
        if options:
            assert any(e.kind == "decode" for e in session.stats.events)
        check_against_reference(model, ids, mask, sequences, logits, session)


@pytest.mark.parametrize("options, match", [
    (dict(scorers={"a": "knorm"}), "at least two"),
    (dict(scorers=["knorm", "snapkv"]), "at least two"),
    (dict(scorers={"a": "knorm", "b": "kvzip"}), "may not replay"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, weights={"a": 1.0}), "weights must name exactly"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, weights={"a": 1.0, "b": -1}), r"weights\['b'\]"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, weights={"a": 0, "b": 0}), "not all be 0"),
    (dict(scorers={"a": "knorm", "b": "no-such"}), "no-such"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, combine="mean"), "combine must be"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"c": 0.1}), "quota must map"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"a": 0.0}), r"quota\['a'\] must be a share"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"a": 0.6, "b": 0.6}), "sum to at most 1"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"a": 0.5}, quota_of="kept"), "quota_of must be"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"a": 0.5}, quota_prompt={"b": 0.1}), "quota_prompt must map"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"a": 0.5}, quota_prompt={"a": 0}), r"quota_prompt\['a'\] must be"),
    (dict(scorers={"a": "knorm", "b": "snapkv"}, quota={"a": 0.5}, quota_prompt={"a": "2%"}), r"quota_prompt\['a'\] must be"),
])
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        get_scorer("rank_mix", **options)


def test_gatekv_mixes_an_adapter_with_scorers(llama):
    from gatekv import GateKV
    from gatekv.heads import Adapter, build_heads

    torch.manual_seed(1)
    adapter = Adapter(build_heads("retaining_head", llama, hidden=8))
    kv = GateKV(llama, adapter=adapter, rank_mix={"adapter": 0.6, "defensivekv": 0.4}, budget=0.3, window=4, sinks=2)
    assert isinstance(kv.scorer, RankMixScorer) and kv.config.scorer is kv.scorer
    assert kv.scorer.members["adapter"] is adapter.heads and kv.scorer.weights == {"adapter": 0.6, "defensivekv": 0.4}
    ids, mask = random_batch(2, 70, pad=[0, 9], seed=3)
    expected = _kept_positions(llama, RankMixScorer({"adapter": adapter.heads, "defensivekv": "defensivekv"},
                                                    {"adapter": 0.6, "defensivekv": 0.4}), ids, mask)
    with torch.no_grad(), kv.session(record=True, allocator="uniform") as session:
        llama(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(llama): session.new_cache()})
    for a, b in zip(session.stats.events[0].kept_positions, expected):
        assert torch.equal(a, b)
    long_form = GateKV(llama, adapter=adapter, rank_mix={"weights": {"adapter": 0.6, "defensivekv": 0.4},
                                                         "quota": {"adapter": 0.5}, "combine": "max"})
    assert long_form.scorer.quota == {"adapter": 0.5} and long_form.scorer.combine == "max"
    with pytest.raises(ValueError, match="takes weights, quota, quota_of, quota_prompt, combine and guide"):
        GateKV(llama, adapter=adapter, rank_mix={"weights": {"adapter": 1.0, "knorm": 1.0}, "floor": 0.1})
    scorers_only = GateKV(llama, rank_mix={"knorm": 1.0, "snapkv": 1.0})
    assert set(scorers_only.scorer.members) == {"knorm", "snapkv"}
    with pytest.raises(ValueError, match="must weigh the adapter's heads"):
        GateKV(llama, adapter=adapter, rank_mix={"knorm": 1.0, "snapkv": 1.0})
    with pytest.raises(ValueError, match="no adapter was given"):
        GateKV(llama, rank_mix={"adapter": 1.0, "snapkv": 1.0})
    with pytest.raises(ValueError, match="either scorer or rank_mix"):
        GateKV(llama, scorer="knorm", rank_mix={"knorm": 1.0, "snapkv": 1.0})
    with pytest.raises(ValueError, match="heads were made for|different base model"):
        GateKV(tiny_model("qwen3"), adapter=adapter, rank_mix={"adapter": 1.0, "snapkv": 1.0})
