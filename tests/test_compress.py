"""compress() on tiny random models of every family: equality with the uncompressed model and with a masked
reference, batch independence, memory accounting, clean exit."""

from __future__ import annotations

import pytest
import torch

from gatekv import compress
from gatekv.cache import CompressedCache
from gatekv.models import cache_kwarg
from masked_reference import reference_logits
from tiny_models import FAMILIES, random_batch, tiny_model

SCORERS = ("streaming_llm", "h2o", "snapkv", "tova", "knorm", "random")
ALLOCATORS = ("uniform", "adakv", "pyramid")
NEW_TOKENS = 4
LOGIT_TOLERANCE = 1e-5  # compressed float32 model vs float64 masked reference, absolute, on logits


def generate(model, ids, mask, **generate_kwargs):
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **generate_kwargs,
    )
    return out.sequences, torch.stack(out.logits, 1)


def check_against_reference(model, ids, mask, sequences, logits, session):
    """Compressed decode logits equal the masked reference's at the same positions."""
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], NEW_TOKENS, dtype=mask.dtype)], 1)
    sliding = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
    ref = reference_logits(model, sequences[:, :-1], full_mask[:, :-1], session.stats.events, sliding)
    prompt = ids.shape[1]
    expected = ref[:, prompt - 1 :].float()
    torch.testing.assert_close(logits, expected, atol=LOGIT_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_covering_prompt_is_identity(models, family):
    model = models[family]
    ids, mask = random_batch(3, 60, pad=[0, 5, 17])
    ref_seq, ref_logits = generate(model, ids, mask)
    for budget in (1.0, 60, 1000):
        with compress(model, "snapkv", "adakv", budget=budget) as session:
            seq, logits = generate(model, ids, mask)
        assert session.stats.noop
        assert torch.equal(seq, ref_seq)
        assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_cache_without_eviction_matches_model(models, family):
    """Our attention path itself (ragged cache, no token evicted) reproduces the stock model."""
    model = models[family]
    ids, mask = random_batch(3, 50, pad=[0, 4, 11])
    ref_seq, ref_logits = generate(model, ids, mask)
    # decode_budget forces the compressed path; it is never reached, so nothing is evicted
    with compress(model, "snapkv", "uniform", budget=1.0, decode_budget=1000) as session:
        seq, logits = generate(model, ids, mask)
    assert isinstance(session.cache, CompressedCache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("scorer", SCORERS)
def test_matches_masked_reference_llama(models, scorer, allocator, prefill):
    model = models["llama"]
    for batch, pad in ((1, [0]), (3, [0, 9, 23])):
        ids, mask = random_batch(batch, 96, pad=pad, seed=batch)
        with compress(model, scorer, allocator, budget=0.3, prefill=prefill, chunk_size=32, window=6, sinks=2, record=True) as session:
            sequences, logits = generate(model, ids, mask)
        kept = session.stats.kept_tokens
        assert int(kept.min()) < 96 - 23  # something was evicted
        check_against_reference(model, ids, mask, sequences, logits, session)


@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_masked_reference_families(models, family, prefill):
    model = models[family]
    ids, mask = random_batch(3, 100, pad=[0, 9, 23], seed=7)
    for scorer, allocator in (("snapkv", "adakv"), ("h2o", "pyramid")):
        with compress(model, scorer, allocator, budget=0.25, prefill=prefill, chunk_size=40, window=8, record=True) as session:
            sequences, logits = generate(model, ids, mask)
        check_against_reference(model, ids, mask, sequences, logits, session)


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_budget_matches_masked_reference(models, family, interval):
    """A fixed-size decode on every family, evicting every step or every ``interval`` steps (decode_interval)."""
    model = models[family]
    ids, mask = random_batch(2, 40, pad=[0, 6], seed=3)
    with compress(model, "tova", "uniform", budget=20, decode_budget=20, window=4, sinks=2, record=True,
                  decode_interval=interval) as session:
        sequences, logits = generate(model, ids, mask)
    # the prompt is cut to 20 = decode_budget: each of the NEW_TOKENS - 1 decode forwards is past the budget
    assert [e.kind for e in session.stats.events].count("decode") == (NEW_TOKENS - 1) // interval
    assert int(session.stats.kept_tokens.max()) <= 20
    check_against_reference(model, ids, mask, sequences, logits, session)


def test_query_aware_observer_is_not_kept(models):
    model = models["llama"]
    ids, mask = random_batch(2, 80, pad=[0, 10], seed=5)
    query = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with compress(model, "snapkv", "uniform", budget=0.25, query=query, window=4, record=True) as session:
        sequences, logits = generate(model, ids, mask)
    # the observer tokens (positions after the prompt) were dropped: kept positions are all prompt tokens
    first = session.stats.events[0]
    for kept in first.kept_positions:
        assert int(kept.max()) <= int(first.last_position.max())
    assert session.cache.get_seq_length() == 80 + NEW_TOKENS - 1
    check_against_reference(model, ids, mask, sequences, logits, session)
    # the observation window changes what is kept compared with the prompt's own last tokens
    with compress(model, "snapkv", "uniform", budget=0.25, window=4, record=True) as plain:
        generate(model, ids, mask)
    differs = any(
        not torch.equal(a, b) for a, b in zip(first.kept_positions, plain.stats.events[0].kept_positions)
    )
    assert differs


def test_query_agnostic_two_step_pattern(models):
    """Compress the context in one forward, then feed the question through generate on the same cache."""
    model = models["qwen3"]
    ids, mask = random_batch(2, 90, pad=[0, 12], seed=11)
    question = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    full_ids = torch.cat([ids, question], 1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1)
    with compress(model, "snapkv", "adakv", budget=0.2, window=4, record=True) as session:
        cache = session.new_cache()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache})
        assert cache.get_seq_length() == 90
        kept_after_context = cache.kept_tokens().clone()
        sequences, logits = generate(model, full_ids, full_mask, **{cache_kwarg(model): cache})
    assert len(session.stats.events) == 1  # the question itself was not compressed
    assert torch.equal(session.stats.events[0].kept_tokens, kept_after_context)
    check_against_reference(model, full_ids, full_mask, sequences, logits, session)


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("prefill", ["one_shot", "chunked"])
def test_batch_row_equals_row_alone(models, allocator, prefill):
    model = models["mistral"]
    ids, mask = random_batch(3, 72, pad=[0, 8, 19], seed=4)
    settings = dict(budget=0.3, prefill=prefill, chunk_size=24, window=4, record=True)
    with compress(model, "snapkv", allocator, **settings) as session:
        sequences, logits = generate(model, ids, mask)
    for b in range(3):
        pad = int((mask[b] == 0).sum())
        row_ids = ids[b : b + 1, pad:]
        with compress(model, "snapkv", allocator, **settings) as alone:
            row_seq, row_logits = generate(model, row_ids, torch.ones_like(row_ids))
        assert torch.equal(row_seq[0], sequences[b, pad:])
        torch.testing.assert_close(row_logits[0], logits[b], atol=1e-5, rtol=1e-5)
        if prefill == "one_shot":
            assert torch.equal(alone.stats.kept_tokens[:, 0], session.stats.kept_tokens[:, b])


def test_padding_never_kept(models):
    model = models["llama"]
    ids, mask = random_batch(3, 64, pad=[0, 20, 40], seed=9)
    with compress(model, "knorm", "adakv", budget=0.5, window=4, sinks=2, record=True) as session:
        generate(model, ids, mask)
    for kept in session.stats.events[0].kept_positions:
        assert bool((kept[..., :1] >= 0).all())  # every head keeps something
        for b, pad in enumerate([0, 20, 40]):
            real = kept[b][kept[b] >= 0]
            assert int(real.max()) < 64 - pad  # positions of real tokens only
    # budgets are per row
    assert session.stats.budget_tokens.tolist() == [32, 22, 12]


def test_kv_bytes_follow_budget(models):
    model = models["llama"]
    ids, mask = random_batch(1, 400, seed=2)
    reserve = 8
    with compress(model, "snapkv", "adakv", budget=0.1, window=8, reserve=reserve) as session:
        generate(model, ids, mask)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    full = per_token * 400
    # slack stated: `reserve` free slots per (row, KV head) and layer
    slack = per_token * reserve
    event = session.stats.events[0]
    assert event.kv_bytes_before >= full
    assert event.kv_bytes_after <= 0.1 * full + slack
    assert session.stats.full_kv_bytes == full


def test_chunked_prefill_peak_is_bounded(models):
    model = models["qwen2"]
    length, chunk, reserve, budget = 480, 32, 8, 48
    ids, mask = random_batch(2, length, pad=[0, 30], seed=6)
    with compress(model, "h2o", "uniform", budget=budget, prefill="chunked", chunk_size=chunk, window=8, reserve=reserve) as session:
        generate(model, ids, mask)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_slot = config.num_hidden_layers * 2 * 2 * config.num_key_value_heads * head_dim * 4  # layers*KV*B*H*d*fp32
    # stated bound: peak KV <= (budget + chunk + reserve) slots per (row, KV head)
    assert session.stats.peak_kv_bytes <= per_slot * (budget + chunk + reserve)
    assert len(session.stats.events) == length // chunk
    one_shot_peak = per_slot * length
    assert session.stats.peak_kv_bytes < one_shot_peak / 4
    # the room sized automatically (reserve None): each chunk's compaction leaves room for exactly the next chunk, so
    # the peak is the budget + one chunk per (row, KV head), not + the decode room as well
    for allocator in ("uniform", "adakv"):
        with compress(model, "h2o", allocator, budget=budget, prefill="chunked", chunk_size=chunk, window=8) as auto:
            out = generate(model, ids, mask)
        chunks = [e for e in auto.stats.events if e.kind == "chunk"]
        assert len(chunks) == length // chunk - 1
        assert auto.stats.peak_kv_bytes == per_slot * (budget + chunk), allocator
        assert chunks[-1].kv_bytes_before == per_slot * (budget + chunk)  # a full chunk appended, nothing more
        with compress(model, "h2o", allocator, budget=budget, prefill="chunked", chunk_size=chunk, window=8,
                      reserve=reserve):
            assert torch.equal(generate(model, ids, mask)[0], out[0])  # the room changes no token


def test_model_unchanged_after_exit(models):
    model = models["phi3"]
    ids, mask = random_batch(2, 50, pad=[0, 3])
    before_seq, before_logits = generate(model, ids, mask)
    impl = model.config._attn_implementation
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with compress(model, "h2o", "adakv", budget=0.2, window=4):
        generate(model, ids, mask)
    assert model.config._attn_implementation == impl
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    after_seq, after_logits = generate(model, ids, mask)
    assert torch.equal(before_seq, after_seq)
    assert torch.equal(before_logits, after_logits)


def test_exit_after_error_restores_model(models):
    model = models["llama"]
    impl = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with compress(model, "snapkv", budget=0.2, window=4):
            model(torch.randint(3, 100, (1, 80)))
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
