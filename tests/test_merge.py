"""The merge step: kernels.merge vs a naive loop, each merger's semantics vs a naive version, and compress() with
merging disabled (= the plain path, masked-reference equal) and enabled (= a naive merge of the recorded plan)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gatekv import compress, get_allocator
from gatekv.allocators import AllocationInput
from gatekv.kernels import layout_from_caps, merge
from gatekv.kernels.reference import merge_reference
from gatekv.merge import MergeContext, Merger, MergeSpec, get_merger
from gatekv.merge.kvmerger import merge_sets
from gatekv.models import cache_kwarg
from test_compress import check_against_reference, generate
from tiny_models import random_batch, tiny_model


# -- the kernel reference ------------------------------------------------------------------------------------------
def _random_merge_case(seed, segments=5, d=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 12, (segments,), generator=g)
    src_starts, src_rows = layout_from_caps(lengths + 2)
    keys = torch.randn(src_rows, d, generator=g).to(dtype)
    values = torch.randn(src_rows, d + 1, generator=g).to(dtype)
    kept_counts = torch.minimum(torch.randint(0, 5, (segments,), generator=g), lengths)
    dst_starts, dst_rows = layout_from_caps(kept_counts + 1)
    kept = [torch.randperm(int(n), generator=g)[: int(k)].sort().values for n, k in zip(lengths, kept_counts)]
    dst_keys = torch.zeros(dst_rows, d, dtype=dtype)
    dst_values = torch.zeros(dst_rows, d + 1, dtype=dtype)
    e_max = 8
    sources = torch.zeros(segments, e_max, dtype=torch.long)
    targets = torch.zeros(segments, e_max, dtype=torch.long)
    weights = torch.rand(segments, e_max, generator=g)
    counts = torch.zeros(segments, dtype=torch.long)
    for s in range(segments):
        for r, slot in enumerate(kept[s].tolist()):
            dst_keys[dst_starts[s] + r] = keys[src_starts[s] + slot]
            dst_values[dst_starts[s] + r] = values[src_starts[s] + slot]
        dropped = [i for i in range(int(lengths[s])) if i not in kept[s].tolist()]
        if kept_counts[s] == 0 or not dropped:
            continue
        n = min(len(dropped), e_max, int(torch.randint(0, e_max + 1, (1,), generator=g)))
        counts[s] = n
        sources[s, :n] = torch.tensor(dropped[:n])
        targets[s, :n] = torch.randint(0, int(kept_counts[s]), (n,), generator=g)
    return dict(dst=[dst_keys, dst_values], dst_starts=dst_starts, src=[keys, values], src_starts=src_starts,
                sources=sources, targets=targets, weights=weights, source_counts=counts)


def _naive_merge(case):
    out = [b.clone().double() for b in case["dst"]]
    for s in range(case["sources"].shape[0]):
        groups: dict[int, list] = {}
        for e in range(int(case["source_counts"][s])):
            groups.setdefault(int(case["targets"][s, e]), []).append(e)
        for r, members in groups.items():
            row = int(case["dst_starts"][s]) + r
            for o, src in zip(out, case["src"]):
                total = o[row].clone()
                weight = 1.0
                for e in members:
                    w = float(case["weights"][s, e])
                    total += w * src[int(case["src_starts"][s]) + int(case["sources"][s, e])].double()
                    weight += w
                o[row] = total / weight
    return out


@pytest.mark.parametrize("seed", range(6))
def test_merge_reference_matches_naive(seed):
    case = _random_merge_case(seed)
    expected = _naive_merge(case)
    merge(**case)
    for got, want in zip(case["dst"], expected):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_merge_nothing_and_bf16():
    case = _random_merge_case(3)
    before = [b.clone() for b in case["dst"]]
    merge_reference(**{**case, "source_counts": torch.zeros_like(case["source_counts"])})
    assert all(torch.equal(a, b) for a, b in zip(before, case["dst"]))
    case16 = _random_merge_case(3, dtype=torch.bfloat16)
    expected = _naive_merge(case16)
    merge(**case16)
    for got, want in zip(case16["dst"], expected):
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_merge_rejects_bad_arguments():
    case = _random_merge_case(0)
    with pytest.raises(ValueError, match="weights"):
        merge(**{**case, "weights": case["weights"][:, :3]})
    with pytest.raises(ValueError, match="targets"):
        merge(**{**case, "targets": case["targets"].float()})


# -- mergers vs naive definitions ----------------------------------------------------------------------------------
def _context(seed=0, batch=2, heads=2, t=14, d=4, keep=5):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, t, d, generator=g)
    keys[:, :, 6:9] = keys[:, :, 6:7] + 0.01 * torch.randn(batch, heads, 3, d, generator=g)  # a similar run
    values = torch.randn(batch, heads, t, d, generator=g)
    scores = torch.rand(batch, heads, t, generator=g)
    scores[1, :, :2] = float("-inf")  # padding
    protected = torch.zeros(batch, heads, t, dtype=torch.bool)
    protected[..., -2:] = True
    inputs = AllocationInput([scores], [protected], torch.tensor([keep, keep]), 2)
    plan = get_allocator("uniform").allocate(inputs)
    positions = torch.arange(t).expand(batch, heads, t).clone()
    positions[1, :, :2] = -1
    return MergeContext(0, keys, values, positions, scores, protected, plan.indices[0], plan.counts[0])


def _dense_targets(ctx, spec):
    """(B, H, T) kept slot each slot merges into (-1 = none) and its weight, from a spec."""
    t = ctx.scores.shape[-1]
    target = torch.full(ctx.scores.shape, -1, dtype=torch.long)
    weight = torch.zeros(ctx.scores.shape)
    for b in range(target.shape[0]):
        for h in range(target.shape[1]):
            for e in range(int(spec.counts[b, h])):
                slot = int(spec.sources[b, h, e])
                target[b, h, slot] = int(ctx.kept_indices[b, h, int(spec.targets[b, h, e])])
                weight[b, h, slot] = float(spec.weights[b, h, e])
    assert int(target.max()) < t
    return target, weight


def test_ems_merges_into_most_similar_kept():
    ctx = _context()
    target, weight = _dense_targets(ctx, get_merger("ems").merge(ctx))
    kept, dropped = ctx.kept_mask(), ctx.dropped()
    for b in range(2):
        for h in range(2):
            for j in range(ctx.scores.shape[-1]):
                if not dropped[b, h, j]:
                    assert target[b, h, j] == -1
                    continue
                sims = {i: float(F.cosine_similarity(ctx.keys[b, h, j], ctx.keys[b, h, i], dim=0)) for i in range(14) if kept[b, h, i]}
                assert int(target[b, h, j]) == max(sims, key=sims.get) and weight[b, h, j] == 1.0
    assert int(get_merger("ems", min_similarity=1.0).merge(ctx).counts.sum()) == 0


def test_kvmerger_runs_and_pivots():
    ctx = _context(1)
    threshold, sigma = 0.9, 2.0
    runs = merge_sets(ctx.keys, ctx.candidates, threshold)
    target, weight = _dense_targets(ctx, get_merger("kvmerger", threshold=threshold, sigma=sigma).merge(ctx))
    kept, dropped = ctx.kept_mask(), ctx.dropped()
    for b in range(2):
        for h in range(2):
            # naive runs: a new run wherever neighbours are not both candidates with similarity >= threshold
            run, naive = 0, []
            for j in range(14):
                if j > 0:
                    sim = float(F.cosine_similarity(ctx.keys[b, h, j], ctx.keys[b, h, j - 1], dim=0))
                    if not (ctx.candidates[b, h, j] and ctx.candidates[b, h, j - 1] and sim >= threshold):
                        run += 1
                naive.append(run)
            assert runs[b, h].tolist() == naive
            for j in range(14):
                members = [i for i in range(14) if naive[i] == naive[j] and kept[b, h, i]]
                if not dropped[b, h, j] or not members:
                    assert target[b, h, j] == -1
                    continue
                rank = lambda i: float("inf") if ctx.protected[b, h, i] else float(ctx.scores[b, h, i])  # noqa: E731
                pivot = max(members, key=rank)
                assert int(target[b, h, j]) == pivot
                assert float(weight[b, h, j]) == pytest.approx(torch.exp(torch.tensor(-((j - pivot) ** 2) / (2 * sigma**2))).item())


def test_d2o_threshold_is_an_ema():
    merger = get_merger("d2o", beta=0.5)
    ctx = _context(2)
    merger.merge(ctx)
    first = merger._threshold[0].clone()
    merger.merge(ctx)
    torch.testing.assert_close(merger._threshold[0], first)  # same input: EMA of equal means
    target, weight = _dense_targets(ctx, merger.merge(ctx))
    merged = target >= 0
    assert bool((weight[merged] >= 0).all())


@pytest.mark.parametrize(
    "name, options, field",
    [("ems", {"min_similarity": 2.0}, "min_similarity"), ("d2o", {"beta": 1.0}, "beta"),
     ("kvmerger", {"threshold": -3}, "threshold"), ("kvmerger", {"sigma": 0}, "sigma"), ("ems", {"alpha": 1}, None)],
)
def test_bad_merge_hyperparameters(name, options, field):
    if field is None:  # ems' alpha belongs to the scorer
        from gatekv.scorers import get_scorer

        with pytest.raises(ValueError, match="alpha"):
            get_scorer("ems", alpha=1.5)
        return
    with pytest.raises(ValueError, match=field):
        get_merger(name, **options)


def test_razor_heads_from_pairs_and_json(tmp_path):
    path = tmp_path / "heads.json"
    path.write_text(json.dumps([[0, 1], [1, 0]]))
    assert get_allocator("razor", retrieval_heads=str(path)).retrieval_heads == [(0, 1), (1, 0)]
    result = {"fingerprint": {"num_q_heads": 4, "num_kv_heads": 2}, "echo": [[0, 0, 0, 1], [1, 0, 0, 0]],
              "induction": [[0] * 4, [0] * 4], "heads_per_layer": 1}
    path.write_text(json.dumps(result))
    assert get_allocator("razor", retrieval_heads=str(path)).retrieval_heads == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="retrieval_heads"):
        get_allocator("razor", retrieval_heads=[(0, -1)])


# -- compress() ------------------------------------------------------------------------------------------------------
class _Recording(Merger):
    """Wraps a merger (or none) and records each layer's context and spec."""

    def __init__(self, inner=None, empty=False):
        self.inner, self.empty, self.records = inner, empty, []

    def merge(self, ctx):
        if self.empty:
            b, h = ctx.kept_counts.shape
            zeros = torch.zeros(b, h, 0, dtype=torch.long)
            spec = MergeSpec(zeros, zeros, zeros.float(), torch.zeros(b, h, dtype=torch.long))
        else:
            spec = self.inner.merge(ctx)
        self.records.append((ctx, spec))
        return spec


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
def test_merging_disabled_is_the_plain_path(llama, prefill):
    ids, mask = random_batch(3, 80, pad=[0, 7, 19], seed=2)
    options = dict(budget=0.3, prefill=prefill, chunk_size=32, window=6, sinks=2, record=True)
    with compress(llama, "ems", "adakv", **options) as plain:
        ref_seq, ref_logits = generate(llama, ids, mask)
    with compress(llama, "ems", "adakv", merge=_Recording(empty=True), **options) as session:
        seq, logits = generate(llama, ids, mask)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    check_against_reference(llama, ids, mask, seq, logits, session)


def _naive_compacted(ctx, spec):
    """Kept keys and values of (B, H) after a naive merge: lists of (count, d) tensors."""
    out = {}
    target, weight = _dense_targets(ctx, spec)
    for b in range(ctx.keys.shape[0]):
        for h in range(ctx.keys.shape[1]):
            kept = ctx.kept_indices[b, h, : int(ctx.kept_counts[b, h])].tolist()
            rows = []
            for x in (ctx.keys, ctx.values):
                merged = []
                for slot in kept:
                    into = (target[b, h] == slot).nonzero().flatten().tolist()
                    total = x[b, h, slot].double() + sum(float(weight[b, h, e]) * x[b, h, e].double() for e in into)
                    merged.append(total / (1.0 + sum(float(weight[b, h, e]) for e in into)))
                rows.append(torch.stack(merged) if merged else x.new_zeros(0, x.shape[-1]).double())
            out[b, h] = rows
    return out


@pytest.mark.parametrize("merger, allocator", [("ems", "adakv"), ("kvmerger", "uniform"), ("d2o", "d2o")])
def test_merging_enabled_equals_naive_merge(llama, merger, allocator):
    ids, mask = random_batch(2, 60, pad=[0, 9], seed=5)
    options = {"kvmerger": {"threshold": 0.3}}.get(merger, {})
    recording = _Recording(get_merger(merger, **options))
    with compress(llama, "ems", allocator, budget=0.3, window=6, sinks=2, merge=recording) as session:
        cache = session.new_cache()
        with torch.no_grad():
            llama(input_ids=ids, attention_mask=mask, **{cache_kwarg(llama): cache})
    assert len(recording.records) == llama.config.num_hidden_layers
    assert sum(int(spec.counts.sum()) for _, spec in recording.records) > 0, "something was merged"
    for layer, (ctx, spec) in enumerate(recording.records):
        keys, values, positions, _ = cache.layers[layer].dense_view()
        expected = _naive_compacted(ctx, spec)
        for (b, h), (k, v) in expected.items():
            n = k.shape[0]
            torch.testing.assert_close(keys[b, h, :n].double(), k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[b, h, :n].double(), v, atol=1e-5, rtol=1e-5)
            assert torch.equal(positions[b, h, :n], ctx.positions[b, h, ctx.kept_indices[b, h, :n]])


def test_razor_session(llama):
    ids, mask = random_batch(2, 50, pad=[0, 5], seed=8)
    retrieval = [(0, 1)]
    recording = _Recording(get_merger("razor"))
    with compress(llama, "streaming_llm", get_allocator("razor", retrieval_heads=retrieval), budget=0.5, window=4,
                  sinks=2, merge=recording) as session:
        cache = session.new_cache()
        with torch.no_grad():
            llama(input_ids=ids, attention_mask=mask, **{cache_kwarg(llama): cache})
    lengths = torch.tensor([50, 45])
    kept = cache.kept_tokens()  # (layers, B, H)
    assert torch.equal(kept[0, :, 1], lengths), "retrieval head keeps everything"
    assert bool((kept[0, :, 0] == 2 + 4 + 1).all()) and bool((kept[1] == 2 + 4 + 1).all())
    ctx, spec = recording.records[1]
    keys = cache.layers[1].dense_view()[0]
    for b in range(2):
        for h in range(2):
            dropped = ctx.dropped()[b, h]
            carrier = int(ctx.kept_indices[b, h, 2])  # after the 2 sinks
            expected = (ctx.keys[b, h, carrier] + ctx.keys[b, h][dropped].sum(0)) / (1 + int(dropped.sum()))
            torch.testing.assert_close(keys[b, h, 2], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interval", [1, 3])
def test_decode_interval_with_a_merger_merges_back_to_the_budget(llama, interval):
    """decode_budget + decode_interval + a merger: an eviction every ``interval`` decode forwards past the budget,
    each one a compaction (merging moves values: not the in-place path) back to decode_budget, whose kept keys and
    values equal a naive merge of the recorded context."""
    ids, mask = random_batch(2, 60, pad=[0, 9], seed=6)
    recording = _Recording(get_merger("ems"))
    layers = llama.config.num_hidden_layers
    budget, steps = 24, 9
    with compress(llama, "tova", "adakv", budget=20, decode_budget=budget, decode_interval=interval, window=4, sinks=2,
                  merge=recording, record=True) as session:
        cache = session.new_cache()
        kwarg = cache_kwarg(llama)
        with torch.no_grad():
            out = llama(input_ids=ids, attention_mask=mask, **{kwarg: cache})
            evictions = 0
            for _ in range(steps):
                mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
                seen = len(recording.records)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = llama(input_ids=token, attention_mask=mask, **{kwarg: cache})
                if len(recording.records) == seen:
                    assert int(cache.kept_tokens().max()) <= budget + interval - 1
                    continue
                evictions += 1
                assert len(recording.records) == seen + layers  # one merge per layer
                for layer, (ctx, spec) in enumerate(recording.records[seen:]):
                    keys, values, positions, _ = cache.layers[layer].dense_view()
                    for (b, h), (k, v) in _naive_compacted(ctx, spec).items():
                        n = k.shape[0]
                        assert n == int(cache.layers[layer].lengths.view(2, -1)[b, h]) <= budget
                        torch.testing.assert_close(keys[b, h, :n].double(), k, atol=1e-5, rtol=1e-5)
                        torch.testing.assert_close(values[b, h, :n].double(), v, atol=1e-5, rtol=1e-5)
    decode = [e for e in session.stats.events if e.kind == "decode"]
    assert evictions == len(decode) > 0
    # the prompt keeps 20 per head: 4 forwards grow it to the budget, then one eviction every `interval` forwards
    assert evictions == (steps - (budget - 20)) // interval
    assert sum(int(spec.counts.sum()) for _, spec in recording.records[layers:]) > 0, "decode steps merged something"
